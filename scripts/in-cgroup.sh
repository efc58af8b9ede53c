#!/bin/sh
# in-cgroup.sh CGROUP_DIR CMD ARGS...: run CMD in a cgroup (v1 controller
# directory), at -10 nice, as the same process (exec), so `$!` and kill
# reach the command itself. Used by the benchmarks to keep their proxies and
# load generators ahead of other work on a shared machine.
cg=$1; shift
echo $$ >"$cg/cgroup.procs"
exec nice -n -10 "$@"
