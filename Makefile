# mosix — the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export MOSIX_REQUIRE_PRIVILEGED ?= 1

.PHONY: setup build test unit integration demo demo-gw demo-kernel bench bench-gw bench-kernel bench-jobnet failover soak up down fmt clippy clean package

## Install what mosix needs (packages, CRIU >= 4.2 built into .cache/criu). Idempotent.
setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --bins

## Unit tests and integration tests on real local clusters (needs root; CRIU from `make setup`).
test: setup
	$(CARGO) build --bins
	$(CARGO) test --lib --bins
	$(CARGO) test --test integration -- --test-threads=2

unit:
	$(CARGO) test --lib --bins

## The article's experiment: many CPU-bound jobs on one node of a capped 4-node cluster, balanced live.
demo: build
	@bash scripts/demo.sh

## mosgw: HTTP instances moved by the balancer under a steady wrk load; requests per node and failures (0).
demo-gw: build
	@bash scripts/demo-gw.sh

## The article's headline experiment for real: a tinyconfig Linux kernel built with mosmake from
## node1 of a capped 4-node cluster (Debian's linux-source, fetched once into .cache/linux-source).
demo-kernel: build
	@bash scripts/demo-kernel.sh

## Benchmarks: migration vs bare CRIU (with a shared path, and without one against CRIU's
## page-server migration), post-copy, balancing quality, moves off a crowded node (with the
## agents' step traces), checkpoints, control-plane scale, the kernel build (bench-kernel) and
## mosgw against nginx and HAProxy (bench-gw), and jobs with their own address (bench-jobnet).
bench: setup
	$(CARGO) build --release --bins
	@rc=0; bash scripts/bench.sh || rc=$$?; bash scripts/bench-kernel.sh || rc=$$?; \
	  bash scripts/bench-gw.sh || rc=$$?; bash scripts/bench-jobnet.sh || rc=$$?; exit $$rc

## The kernel-build benchmark alone: plain make on node1 vs mosmake over 4 nodes, start overhead, burst skew.
bench-kernel: setup
	$(CARGO) build --release --bins
	@bash scripts/bench-kernel.sh

## mosgw vs Debian's nginx and HAProxy (throughput, latency; failures while instances migrate under load).
bench-gw: setup
	$(CARGO) build --release --bins
	@bash scripts/bench-gw.sh

## Jobs with their own address (issue 18): extra frozen time at 1/100/1000 connections vs none,
## the peer's stall, resets over 100 moves.
bench-jobnet: setup
	$(CARGO) build --release --bins
	@bash scripts/bench-jobnet.sh

## Node loss (issue 16): detection and restart after a node's death, work lost, checkpoint frozen
## time, and 200 injected faults with the duplicates counted. About 30 minutes.
failover: setup
	$(CARGO) build --release --bins
	@bash scripts/bench-failover.sh

## Long soak: hundreds of round-trip migrations of a stateful job.
soak: build
	$(CARGO) test --test integration -- --ignored soak --nocapture

## The Debian package target/debian/mosix_<version>_<arch>.deb (release binaries, CRIU from
## `make setup`, systemd units, /etc/mosix/mosixd.toml, man pages); README: "Joining a cluster".
package: setup
	@bash scripts/package.sh

## A 2-node local cluster for trying things by hand (`make down` removes it).
up: build
	./target/debug/mosctl local up --nodes $${NODES:-2}

down:
	./target/debug/mosctl local down

fmt:
	$(CARGO) fmt

clippy:
	$(CARGO) clippy --all-targets

clean:
	-./target/debug/mosctl local down 2>/dev/null
	$(CARGO) clean
	rm -rf .cache
