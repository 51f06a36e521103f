//! The VM's run states and the one table of transitions between them:
//! QEMU's (system/runstate.c), restricted to the states Ferry has, plus
//! `prelaunch-migrate` — an incoming stream is fully loaded and the guest
//! is about to start (QMP reports it as `paused`, see [`RunState::qmp_name`]).
//! Leaving it for `running` is what triggers the network announce (seeds
//! 000/001); so does leaving `postmigrate` for `running` (the source
//! resumed after its destination failed); nothing else does.

use std::fmt;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Prelaunch,
    Inmigrate,
    PrelaunchMigrate,
    Running,
    Paused,
    FinishMigrate,
    Postmigrate,
    SaveVm,
    RestoreVm,
    Shutdown,
    InternalError,
}

use RunState::*;

impl RunState {
    pub const ALL: [RunState; 11] = [
        Prelaunch,
        Inmigrate,
        PrelaunchMigrate,
        Running,
        Paused,
        FinishMigrate,
        Postmigrate,
        SaveVm,
        RestoreVm,
        Shutdown,
        InternalError,
    ];

    /// The name QMP's `query-status` reports (QEMU's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Prelaunch => "prelaunch",
            Inmigrate => "inmigrate",
            PrelaunchMigrate => "prelaunch-migrate",
            Running => "running",
            Paused => "paused",
            FinishMigrate => "finish-migrate",
            Postmigrate => "postmigrate",
            SaveVm => "save-vm",
            RestoreVm => "restore-vm",
            Shutdown => "shutdown",
            InternalError => "internal-error",
        }
    }

    /// The name QMP reports (`query-status`): QEMU's states only, so an
    /// orchestrator never meets one it does not know. `prelaunch-migrate`
    /// is `paused` there — what QEMU reports for an arrived guest that
    /// has not started (-S, or paused on the source); libvirt reads any
    /// other name as "unknown status". It stays a state of its own
    /// inside Ferry because leaving it is what announces the guest.
    pub fn qmp_name(self) -> &'static str {
        match self {
            PrelaunchMigrate => "paused",
            other => other.name(),
        }
    }

    /// Whether vCPUs run in this state.
    pub fn is_running(self) -> bool {
        self == Running
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every allowed (from, to) pair.
pub const TRANSITIONS: &[(RunState, RunState)] = &[
    (Prelaunch, Inmigrate),
    (Prelaunch, Running),
    (Prelaunch, FinishMigrate),
    (Inmigrate, InternalError),
    (Inmigrate, Paused),
    (Inmigrate, Running),
    (Inmigrate, Shutdown),
    (Inmigrate, FinishMigrate),
    (Inmigrate, Prelaunch),
    (Inmigrate, Postmigrate),
    // Ferry's addition: the stream is loaded, the guest not yet started.
    (Inmigrate, PrelaunchMigrate),
    (PrelaunchMigrate, Running),
    (PrelaunchMigrate, Paused),
    (PrelaunchMigrate, Shutdown),
    // An arrived guest not yet started may be migrated (or saved) on; a
    // failure returns it here, still to be announced.
    (PrelaunchMigrate, FinishMigrate),
    (FinishMigrate, PrelaunchMigrate),
    (InternalError, Paused),
    (InternalError, FinishMigrate),
    (InternalError, Prelaunch),
    (Paused, Running),
    (Paused, FinishMigrate),
    (Paused, Postmigrate),
    (Paused, Prelaunch),
    (Postmigrate, Running),
    (Postmigrate, FinishMigrate),
    (Postmigrate, Prelaunch),
    (FinishMigrate, Running),
    (FinishMigrate, Paused),
    (FinishMigrate, Postmigrate),
    (FinishMigrate, Prelaunch),
    (FinishMigrate, InternalError),
    (FinishMigrate, Shutdown),
    (RestoreVm, Running),
    (RestoreVm, Prelaunch),
    (Running, InternalError),
    (Running, Paused),
    (Running, FinishMigrate),
    (Running, RestoreVm),
    (Running, SaveVm),
    (Running, Shutdown),
    (SaveVm, Running),
    (Shutdown, Paused),
    (Shutdown, FinishMigrate),
    (Shutdown, Prelaunch),
];

pub fn allowed(from: RunState, to: RunState) -> bool {
    TRANSITIONS.contains(&(from, to))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("run state {from} cannot go to {to}")]
pub struct IllegalTransition {
    pub from: RunState,
    pub to: RunState,
}

/// The current state and the record of how it got there.
#[derive(Debug)]
pub struct RunStateMachine {
    state: RunState,
    history: Vec<(RunState, RunState)>,
}

impl RunStateMachine {
    pub fn new(initial: RunState) -> Self {
        Self {
            state: initial,
            history: Vec::new(),
        }
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// Moves to `to` if the table allows it. Staying in the same state is
    /// allowed and not recorded, as in QEMU.
    pub fn transition(&mut self, to: RunState) -> Result<RunState, IllegalTransition> {
        let from = self.state;
        if from == to {
            return Ok(from);
        }
        if !allowed(from, to) {
            return Err(IllegalTransition { from, to });
        }
        log::info!("run state: {from} -> {to}");
        self.state = to;
        self.history.push((from, to));
        Ok(from)
    }

    /// Every transition made, in order.
    pub fn history(&self) -> &[(RunState, RunState)] {
        &self.history
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_transition_is_allowed() {
        for &(from, to) in TRANSITIONS {
            let mut m = RunStateMachine::new(from);
            assert_eq!(m.transition(to), Ok(from), "{from} -> {to}");
            assert_eq!(m.state(), to);
            assert_eq!(m.history(), &[(from, to)]);
        }
    }

    #[test]
    fn unlisted_transitions_are_typed_errors() {
        let samples = [
            (Running, Prelaunch),
            (Running, Inmigrate),
            (Running, PrelaunchMigrate),
            (Paused, PrelaunchMigrate),
            (Prelaunch, PrelaunchMigrate),
            (Prelaunch, Paused),
            (Shutdown, Running),
            (Postmigrate, Paused),
            (PrelaunchMigrate, Inmigrate),
            (PrelaunchMigrate, Prelaunch),
            (SaveVm, Paused),
            (InternalError, Running),
        ];
        for (from, to) in samples {
            let mut m = RunStateMachine::new(from);
            assert_eq!(m.transition(to), Err(IllegalTransition { from, to }));
            assert_eq!(m.state(), from, "a refused transition changes nothing");
            assert!(m.history().is_empty());
        }
        // Exhaustively: exactly the listed pairs are allowed.
        let allowed_count = RunState::ALL
            .iter()
            .flat_map(|&a| RunState::ALL.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a != b && allowed(a, b))
            .count();
        assert_eq!(allowed_count, TRANSITIONS.len());
    }

    #[test]
    fn prelaunch_migrate_is_reached_from_inmigrate_or_a_failed_migration_on() {
        let sources: Vec<RunState> = TRANSITIONS
            .iter()
            .filter(|t| t.1 == PrelaunchMigrate)
            .map(|t| t.0)
            .collect();
        assert_eq!(sources, vec![Inmigrate, FinishMigrate]);
        let exits: Vec<RunState> = TRANSITIONS
            .iter()
            .filter(|t| t.0 == PrelaunchMigrate)
            .map(|t| t.1)
            .collect();
        assert_eq!(exits, vec![Running, Paused, Shutdown, FinishMigrate]);
        assert_eq!(PrelaunchMigrate.name(), "prelaunch-migrate");
        assert_eq!(PrelaunchMigrate.qmp_name(), "paused");
    }
}
