//! What the runner decides, whoever runs the workers: the order of commands for
//! one scenario ([`ordering`]), who gets a worker slot ([`admission`]), the
//! phases of a scenario's life ([`phase`]), whether its source ends on its own
//! ([`source`]), what happens when its worker ends ([`restart`], and for
//! worker processes [`lifecycle`] and [`supervision`]) and the
//! `scenario_events` message ([`events`]). Pure code,
//! no I/O: the operator (`controller`, workers as Pods) and the local
//! supervisor (workers as child processes) both carry out what these
//! functions decide.

pub mod admission;
pub mod events;
pub mod health;
pub mod lifecycle;
pub mod ordering;
pub mod phase;
pub mod restart;
pub mod source;
pub mod supervision;

pub use phase::Phase;
