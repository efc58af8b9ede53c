//! proto ↔ agent conversions of foreground jobs (`Exec`, `GetSlots`,
//! `Runner.Run`); the rest of the API is in [`super::convert`].

use super::convert::InvalidRequest;
use super::pb;
use crate::agent::exec::{
    ExecIn, ExecOut, ExecStart, ExitInfo, Failure, FailureKind, NodeSlots, Started,
};
use crate::agent::runner::{RunIn, RunOut, RunStart};

impl From<&ExecStart> for pb::ExecStart {
    fn from(s: &ExecStart) -> Self {
        pb::ExecStart {
            argv: s.argv.clone(),
            env: s.env.iter().cloned().collect(),
            cwd: s.cwd.clone(),
            uid: s.uid,
            gid: s.gid,
            umask: s.umask,
            pinned: s.pinned,
            non_migratable: s.non_migratable,
            name: s.name.clone(),
            take_slot: s.take_slot,
            service: s
                .service
                .as_ref()
                .map(|d| d.name.clone())
                .unwrap_or_default(),
            port: s.service.as_ref().map(|d| u32::from(d.port)).unwrap_or(0),
            nice: s.nice,
        }
    }
}

impl TryFrom<pb::ExecStart> for ExecStart {
    type Error = InvalidRequest;
    fn try_from(s: pb::ExecStart) -> Result<Self, InvalidRequest> {
        if s.argv.is_empty() || s.argv[0].is_empty() {
            return Err(InvalidRequest {
                field: "argv",
                why: "must name a command".into(),
            });
        }
        let mut env: Vec<(String, String)> = s.env.into_iter().collect();
        env.sort();
        Ok(ExecStart {
            argv: s.argv,
            env,
            cwd: s.cwd,
            uid: s.uid,
            gid: s.gid,
            umask: s.umask,
            pinned: s.pinned,
            non_migratable: s.non_migratable,
            service: super::convert::service_decl(&s.service, s.port)?,
            name: s.name,
            take_slot: s.take_slot,
            nice: match s.nice {
                Some(n) if !(-20..=19).contains(&n) => {
                    return Err(InvalidRequest {
                        field: "nice",
                        why: format!("{n} is not a nice value (-20..19)"),
                    })
                }
                n => n,
            },
        })
    }
}

impl From<&ExecStart> for pb::ExecInput {
    fn from(s: &ExecStart) -> Self {
        pb::ExecInput {
            msg: Some(pb::exec_input::Msg::Start(pb::ExecStart::from(s))),
        }
    }
}

impl From<&ExecIn> for pb::ExecInput {
    fn from(m: &ExecIn) -> Self {
        use pb::exec_input::Msg;
        pb::ExecInput {
            msg: Some(match m {
                ExecIn::Stdin(b) => Msg::Stdin(b.clone()),
                ExecIn::StdinEof => Msg::StdinEof(true),
                ExecIn::Signal(s) => Msg::Signal(*s),
                ExecIn::Heartbeat => Msg::Heartbeat(true),
            }),
        }
    }
}

/// The first message of an `Exec` stream, or one after it.
pub enum ExecInput {
    Start(ExecStart),
    In(ExecIn),
}

impl TryFrom<pb::ExecInput> for ExecInput {
    type Error = InvalidRequest;
    fn try_from(m: pb::ExecInput) -> Result<Self, InvalidRequest> {
        use pb::exec_input::Msg;
        Ok(match m.msg {
            Some(Msg::Start(s)) => ExecInput::Start(ExecStart::try_from(s)?),
            Some(Msg::Stdin(b)) => ExecInput::In(ExecIn::Stdin(b)),
            Some(Msg::StdinEof(_)) => ExecInput::In(ExecIn::StdinEof),
            Some(Msg::Signal(s)) => ExecInput::In(ExecIn::Signal(s)),
            Some(Msg::Heartbeat(_)) | None => ExecInput::In(ExecIn::Heartbeat),
        })
    }
}

impl From<FailureKind> for pb::FailureKind {
    fn from(k: FailureKind) -> Self {
        match k {
            FailureKind::CommandNotFound => pb::FailureKind::CommandNotFound,
            FailureKind::NotExecutable => pb::FailureKind::NotExecutable,
            FailureKind::BadCwd => pb::FailureKind::BadCwd,
            FailureKind::NoSlot => pb::FailureKind::NoSlot,
            FailureKind::UnknownNode => pb::FailureKind::UnknownNode,
            FailureKind::NoNode => pb::FailureKind::NoNode,
            FailureKind::NodeLost => pb::FailureKind::NodeLost,
            FailureKind::Invalid => pb::FailureKind::Invalid,
            FailureKind::Internal => pb::FailureKind::Internal,
            FailureKind::NodeBlocked => pb::FailureKind::NodeBlocked,
        }
    }
}

impl From<pb::FailureKind> for FailureKind {
    fn from(k: pb::FailureKind) -> Self {
        match k {
            pb::FailureKind::CommandNotFound => FailureKind::CommandNotFound,
            pb::FailureKind::NotExecutable => FailureKind::NotExecutable,
            pb::FailureKind::BadCwd => FailureKind::BadCwd,
            pb::FailureKind::NoSlot => FailureKind::NoSlot,
            pb::FailureKind::UnknownNode => FailureKind::UnknownNode,
            pb::FailureKind::NoNode => FailureKind::NoNode,
            pb::FailureKind::NodeLost => FailureKind::NodeLost,
            pb::FailureKind::Invalid => FailureKind::Invalid,
            pb::FailureKind::NodeBlocked => FailureKind::NodeBlocked,
            pb::FailureKind::Internal | pb::FailureKind::Unspecified => FailureKind::Internal,
        }
    }
}

impl From<&Failure> for pb::ExecFailure {
    fn from(f: &Failure) -> Self {
        pb::ExecFailure {
            kind: pb::FailureKind::from(f.kind) as i32,
            message: f.message.clone(),
        }
    }
}

impl From<pb::ExecFailure> for Failure {
    fn from(f: pb::ExecFailure) -> Self {
        Failure {
            kind: pb::FailureKind::try_from(f.kind)
                .unwrap_or(pb::FailureKind::Internal)
                .into(),
            message: f.message,
        }
    }
}

impl From<&Started> for pb::ExecStarted {
    fn from(s: &Started) -> Self {
        pb::ExecStarted {
            job_id: s.job.clone(),
            node: s.node.clone(),
            pid: s.pid,
        }
    }
}

impl From<&ExitInfo> for pb::ExecExit {
    fn from(e: &ExitInfo) -> Self {
        pb::ExecExit {
            exit_code: e.code,
            exit_signal: e.signal,
            error: e.error.clone(),
        }
    }
}

impl From<pb::ExecExit> for ExitInfo {
    fn from(e: pb::ExecExit) -> Self {
        ExitInfo {
            code: e.exit_code,
            signal: e.exit_signal,
            error: e.error,
        }
    }
}

impl From<&ExecOut> for pb::ExecOutput {
    fn from(o: &ExecOut) -> Self {
        use pb::exec_output::Msg;
        pb::ExecOutput {
            msg: Some(match o {
                ExecOut::Started(s) => Msg::Started(s.into()),
                ExecOut::Stdout(b) => Msg::Stdout(b.clone()),
                ExecOut::Stderr(b) => Msg::Stderr(b.clone()),
                ExecOut::Exit(e) => Msg::Exit(e.into()),
                ExecOut::Heartbeat => Msg::Heartbeat(true),
                ExecOut::Failure(f) => Msg::Failure(f.into()),
            }),
        }
    }
}

impl TryFrom<pb::ExecOutput> for ExecOut {
    type Error = InvalidRequest;
    fn try_from(o: pb::ExecOutput) -> Result<Self, InvalidRequest> {
        use pb::exec_output::Msg;
        Ok(match o.msg {
            Some(Msg::Started(s)) => ExecOut::Started(Started {
                job: s.job_id,
                node: s.node,
                pid: s.pid,
            }),
            Some(Msg::Stdout(b)) => ExecOut::Stdout(b),
            Some(Msg::Stderr(b)) => ExecOut::Stderr(b),
            Some(Msg::Exit(e)) => ExecOut::Exit(e.into()),
            Some(Msg::Heartbeat(_)) => ExecOut::Heartbeat,
            Some(Msg::Failure(f)) => ExecOut::Failure(f.into()),
            None => {
                return Err(InvalidRequest {
                    field: "msg",
                    why: "empty ExecOutput".into(),
                })
            }
        })
    }
}

impl From<pb::NodeSlots> for NodeSlots {
    fn from(s: pb::NodeSlots) -> Self {
        NodeSlots {
            node: s.node,
            capacity: s.capacity,
            slots: s.slots,
            used: s.used,
            background_load: s.background_load,
            mem_available_bytes: s.mem_available_bytes,
            blocked: s.blocked,
            speed: s.speed,
        }
    }
}

impl From<&NodeSlots> for pb::NodeSlots {
    fn from(s: &NodeSlots) -> Self {
        pb::NodeSlots {
            node: s.node.clone(),
            capacity: s.capacity,
            slots: s.slots,
            used: s.used,
            background_load: s.background_load,
            mem_available_bytes: s.mem_available_bytes,
            blocked: s.blocked,
            speed: s.speed,
        }
    }
}

/// The first message of a `Run` stream, or one after it.
pub enum RunInput {
    Start(RunStart),
    In(RunIn),
}

impl TryFrom<pb::RunInput> for RunInput {
    type Error = InvalidRequest;
    fn try_from(m: pb::RunInput) -> Result<Self, InvalidRequest> {
        use pb::run_input::Msg;
        Ok(match m.msg {
            Some(Msg::Start(s)) => RunInput::Start(RunStart {
                exec: ExecStart::try_from(s.exec.ok_or(InvalidRequest {
                    field: "exec",
                    why: "missing".into(),
                })?)?,
                node: (!s.node.is_empty()).then_some(s.node),
                rerun_on_node_loss: s.rerun_on_node_loss,
            }),
            Some(Msg::Stdin(b)) => RunInput::In(RunIn::Stdin(b)),
            Some(Msg::StdinEof(_)) => RunInput::In(RunIn::StdinEof),
            Some(Msg::Signal(s)) => RunInput::In(RunIn::Signal(s)),
            None => {
                return Err(InvalidRequest {
                    field: "msg",
                    why: "empty RunInput".into(),
                })
            }
        })
    }
}

impl From<&RunOut> for pb::RunOutput {
    fn from(o: &RunOut) -> Self {
        use pb::run_output::Msg;
        pb::RunOutput {
            msg: Some(match o {
                RunOut::Placed {
                    node,
                    place_ms,
                    queued_ms,
                } => Msg::Placed(pb::RunPlaced {
                    node: node.clone(),
                    place_ms: *place_ms,
                    queued_ms: *queued_ms,
                }),
                RunOut::Started(s) => Msg::Started(s.into()),
                RunOut::Stdout(b) => Msg::Stdout(b.clone()),
                RunOut::Stderr(b) => Msg::Stderr(b.clone()),
                RunOut::Notice(n) => Msg::Notice(n.clone()),
                RunOut::Exit(e) => Msg::Exit(e.into()),
                RunOut::Failure(f) => Msg::Failure(f.into()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_messages_survive_the_wire() {
        let outs = [
            ExecOut::Started(Started {
                job: "j1".into(),
                node: "node2".into(),
                pid: 42,
            }),
            ExecOut::Stdout(b"out".to_vec()),
            ExecOut::Stderr(vec![0, 255]),
            ExecOut::Heartbeat,
            ExecOut::Exit(ExitInfo {
                code: None,
                signal: Some(9),
                error: String::new(),
            }),
            ExecOut::Failure(Failure::new(FailureKind::BadCwd, "no such dir")),
            ExecOut::Failure(Failure::new(FailureKind::NoSlot, "full")),
        ];
        for o in outs {
            assert_eq!(ExecOut::try_from(pb::ExecOutput::from(&o)).unwrap(), o);
        }
        assert!(ExecOut::try_from(pb::ExecOutput { msg: None }).is_err());
        for i in [
            ExecIn::Stdin(b"x".to_vec()),
            ExecIn::StdinEof,
            ExecIn::Signal(2),
            ExecIn::Heartbeat,
        ] {
            match ExecInput::try_from(pb::ExecInput::from(&i)) {
                Ok(ExecInput::In(back)) => assert_eq!(back, i),
                _ => panic!("{i:?} did not come back"),
            }
        }
    }

    #[test]
    fn a_start_without_a_command_is_refused() {
        let s = ExecStart::default();
        assert!(ExecInput::try_from(pb::ExecInput::from(&s)).is_err());
        let s = ExecStart {
            argv: vec!["true".into()],
            umask: Some(0o027),
            take_slot: true,
            nice: Some(10),
            ..Default::default()
        };
        match ExecInput::try_from(pb::ExecInput::from(&s)) {
            Ok(ExecInput::Start(back)) => {
                assert_eq!(back.umask, Some(0o027));
                assert_eq!(back.nice, Some(10));
                assert!(back.take_slot);
            }
            _ => panic!("start did not come back"),
        }
        let mut bad = pb::ExecStart::from(&s);
        bad.nice = Some(25);
        let e = ExecStart::try_from(bad).unwrap_err();
        assert!(e.why.contains("25 is not a nice value"), "{}", e.why);
        // A Run without its exec part, or empty, is refused.
        let empty = pb::RunInput {
            msg: Some(pb::run_input::Msg::Start(pb::RunStart::default())),
        };
        assert!(RunInput::try_from(empty).is_err());
        assert!(RunInput::try_from(pb::RunInput { msg: None }).is_err());
    }
}
