//! Validated configuration values shared by every subcommand.
//!
//! Each type parses from the string a flag or environment variable carries and
//! refuses anything else with a message that names the variable, the value and
//! what is allowed, so a bad setting stops start-up in one readable line.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Log verbosity with the original service's names (`DEBUG`, `INFO`, `WARNING`, `ERROR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(LogLevel::Debug),
            "INFO" => Ok(LogLevel::Info),
            "WARNING" | "WARN" => Ok(LogLevel::Warning),
            "ERROR" => Ok(LogLevel::Error),
            _ => Err(format!(
                "LOG_LEVEL={s:?} is not a level; use one of DEBUG, INFO, WARNING, ERROR (any case)"
            )),
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warning => "WARNING",
            LogLevel::Error => "ERROR",
        };
        f.write_str(name)
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The number of workers one runner keeps alive at most (an integer ≥ 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxWorkers(pub usize);

impl FromStr for MaxWorkers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(MaxWorkers(n)),
            _ => Err(format!(
                "MAX_WORKERS={s:?} is not allowed; use a whole number of at least 1"
            )),
        }
    }
}

/// Frames per second a worker processes (a number > 0; fractions such as 0.5 allowed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VideoFps(f64);

impl VideoFps {
    pub fn new(fps: f64) -> Result<Self, String> {
        if fps.is_finite() && fps > 0.0 && fps <= 1000.0 {
            Ok(VideoFps(fps))
        } else {
            Err(format!(
                "VIDEO_FPS={fps} is not allowed; use a number greater than 0 and at most 1000 (fractions such as 0.5 are fine)"
            ))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// The sampling period, 1/fps.
    pub fn period(self) -> Duration {
        Duration::from_secs_f64(1.0 / self.0)
    }
}

impl FromStr for VideoFps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fps: f64 = s.trim().parse().map_err(|_| {
            format!(
                "VIDEO_FPS={s:?} is not a number; use a number greater than 0 (fractions such as 0.5 are fine)"
            )
        })?;
        VideoFps::new(fps).map_err(|_| {
            format!(
                "VIDEO_FPS={s:?} is not allowed; use a number greater than 0 and at most 1000 (fractions such as 0.5 are fine)"
            )
        })
    }
}

impl fmt::Display for VideoFps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A Kafka bootstrap list (`host:port[,host:port...]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapServers(String);

impl BootstrapServers {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for BootstrapServers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "KAFKA_BOOTSTRAP_SERVERS={s:?} is not allowed; use host:port, comma-separated for several brokers"
            )
        };
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(bad());
        }
        for server in trimmed.split(',') {
            let (host, port) = server.trim().rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
        }
        Ok(BootstrapServers(trimmed.to_string()))
    }
}

impl fmt::Display for BootstrapServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A duration given in milliseconds (an integer ≥ 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Millis(pub Duration);

impl FromStr for Millis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<u64>() {
            Ok(n) if n >= 1 => Ok(Millis(Duration::from_millis(n))),
            _ => Err(format!(
                "{s:?} is not a duration; use a whole number of milliseconds of at least 1"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_accepts_any_case_and_maps_warning() {
        assert_eq!("info".parse::<LogLevel>().unwrap(), LogLevel::Info);
        assert_eq!("Warning".parse::<LogLevel>().unwrap().directive(), "warn");
        assert_eq!("DEBUG".parse::<LogLevel>().unwrap(), LogLevel::Debug);
        let err = "loud".parse::<LogLevel>().unwrap_err();
        assert!(err.contains("LOG_LEVEL") && err.contains("loud") && err.contains("WARNING"));
    }

    #[test]
    fn max_workers_must_be_at_least_one() {
        assert_eq!("4".parse::<MaxWorkers>().unwrap(), MaxWorkers(4));
        for bad in ["0", "-1", "2.5", "many", ""] {
            let err = bad.parse::<MaxWorkers>().unwrap_err();
            assert!(
                err.contains("MAX_WORKERS") && err.contains("at least 1"),
                "{err}"
            );
        }
    }

    #[test]
    fn video_fps_allows_fractions_but_not_zero() {
        assert_eq!("0.5".parse::<VideoFps>().unwrap().get(), 0.5);
        assert_eq!(
            "2".parse::<VideoFps>().unwrap().period(),
            Duration::from_millis(500)
        );
        for bad in ["0", "-2", "NaN", "inf", "fast"] {
            let err = bad.parse::<VideoFps>().unwrap_err();
            assert!(err.contains("VIDEO_FPS") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn bootstrap_servers_need_host_and_port() {
        assert!("localhost:9092".parse::<BootstrapServers>().is_ok());
        assert!("a:1,b:2".parse::<BootstrapServers>().is_ok());
        for bad in ["", "localhost", "host:port", ":9092"] {
            let err = bad.parse::<BootstrapServers>().unwrap_err();
            assert!(err.contains("KAFKA_BOOTSTRAP_SERVERS"), "{err}");
        }
    }
}
