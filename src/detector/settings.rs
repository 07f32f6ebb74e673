//! Validated detector settings: each parses from the string a flag or
//! environment variable carries and refuses anything else with a message
//! naming the value and what is allowed (clap adds the variable's name).

use std::fmt;
use std::str::FromStr;

/// A score threshold in 0–1 (confidence or NMS overlap).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold(f32);

impl Threshold {
    pub fn get(self) -> f32 {
        self.0
    }
}

impl FromStr for Threshold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<f32>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(Threshold(v)),
            _ => Err(format!(
                "{s:?} is not allowed; use a number from 0 to 1, such as 0.5"
            )),
        }
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The side of the square network input, in pixels: 416 (YOLOv4-tiny's
/// trained size) or 320 (faster, finds fewer small objects).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputSize(i32);

impl InputSize {
    pub const ALLOWED: [i32; 2] = [416, 320];

    pub fn get(self) -> i32 {
        self.0
    }
}

impl Default for InputSize {
    fn default() -> Self {
        InputSize(416)
    }
}

impl FromStr for InputSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<i32>() {
            Ok(v) if InputSize::ALLOWED.contains(&v) => Ok(InputSize(v)),
            _ => Err(format!("{s:?} is not allowed; use 416 or 320")),
        }
    }
}

impl fmt::Display for InputSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which classes are reported: all (empty) or the listed names, for
/// example `person,car`. Names are checked against the model's at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassFilter(Vec<String>);

impl ClassFilter {
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

impl FromStr for ClassFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let names: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        if names.is_empty() && !s.trim().is_empty() {
            return Err(format!(
                "{s:?} names no class; use comma-separated class names such as person,car, or leave it empty for all"
            ));
        }
        Ok(ClassFilter(names))
    }
}

impl fmt::Display for ClassFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.join(","))
    }
}

/// OpenCV's threads for inference (a whole number ≥ 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threads(pub u32);

impl FromStr for Threads {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<u32>() {
            Ok(n) if (1..=256).contains(&n) => Ok(Threads(n)),
            _ => Err(format!(
                "{s:?} is not allowed; use a whole number from 1 to 256"
            )),
        }
    }
}

impl fmt::Display for Threads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_in_zero_to_one() {
        assert_eq!("0.45".parse::<Threshold>().unwrap().get(), 0.45);
        for bad in ["1.5", "-0.1", "NaN", "high", ""] {
            let err = bad.parse::<Threshold>().unwrap_err();
            assert!(err.contains("from 0 to 1"), "{err}");
        }
    }

    #[test]
    fn input_size_is_416_or_320() {
        assert_eq!("320".parse::<InputSize>().unwrap().get(), 320);
        assert_eq!(InputSize::default().get(), 416);
        assert!(
            "608"
                .parse::<InputSize>()
                .unwrap_err()
                .contains("416 or 320")
        );
    }

    #[test]
    fn class_filter_is_a_comma_list() {
        let f: ClassFilter = " person, car ,".parse().unwrap();
        assert_eq!(f.names(), ["person", "car"]);
        assert!("".parse::<ClassFilter>().unwrap().names().is_empty());
        assert!(",".parse::<ClassFilter>().is_err());
    }

    #[test]
    fn threads_are_at_least_one() {
        assert_eq!("2".parse::<Threads>().unwrap(), Threads(2));
        assert!("0".parse::<Threads>().is_err());
    }
}
