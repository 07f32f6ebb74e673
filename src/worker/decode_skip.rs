//! Decoding only what sampling needs (`DECODE_SKIP`). FFmpeg's decoder can
//! leave frames undecoded (its `skip_frame`, which OpenCV sets from the
//! `avdiscard` capture option when a capture opens); a skipped frame never
//! reaches the capture loop, whose next `grab` returns the next decoded frame
//! with its own timestamp. The sampler then takes the first *decoded* frame
//! at or after each due time, so skipping moves a sample later in time by a
//! bounded amount and never changes what a result holds.
//!
//! - Non-reference frames (`nonref`): frames no other frame is predicted from
//!   (H.264's non-reference B-frames; MPEG-4's B-frames). Every other frame
//!   decodes exactly as in a full decode. A sample moves by at most the
//!   longest run of consecutive non-reference frames: one frame interval with
//!   x264's default B-pyramid, up to the B-frame count (3 frames, 120 ms at
//!   25 fps, by default) without it; never for streams without B-frames.
//! - Keyframes only (`keyframes`): a sample lands on the first keyframe at or
//!   after its due time, at most one keyframe interval minus one frame later.
//! - Every B-frame (`bidir`, opt-in): also the B-frames other frames are
//!   predicted from (x264's B-pyramid), the cheapest decode short of
//!   keyframes only. A sample moves by at most the longest run of B-frames,
//!   and it changes pixels: a frame predicted from a skipped B-frame decodes
//!   with small errors that last until the next keyframe, so detections
//!   agree with a full decode within a tolerance, not exactly.
//!
//! `auto` (the default) skips non-reference frames when each sampling period
//! spans at least [`MIN_FRAMES_PER_SAMPLE`] frames (so every period holds a
//! reference frame and no sample is lost), and for local files decodes
//! keyframes only when a demux-only pass over the file shows that every
//! sampling period holding a frame holds a keyframe: the same number of
//! results, each at most one period late.

/// `DECODE_SKIP`: which frames the worker leaves undecoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecodeSkip {
    /// Non-reference frames when VIDEO_FPS is at most a quarter of the stream's rate; keyframes only for a local file whose every sampling period holds a keyframe.
    Auto,
    /// Decode every frame.
    Off,
    /// Skip non-reference frames (B-frames nothing is predicted from) whatever the rates.
    Nonref,
    /// Decode keyframes only: a sample moves to the next keyframe, and a stream with fewer keyframes than VIDEO_FPS gives one result per keyframe.
    Keyframes,
    /// Skip every B-frame, also those other frames are predicted from: cheaper than nonref, but frames predicted from a skipped one decode with small errors until the next keyframe (docs/performance.md measures what it does to detections).
    Bidir,
}

/// What the decoder is told to leave out when a capture opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    Nothing,
    NonReference,
    Bidirectional,
    NonKey,
}

impl Discard {
    /// OpenCV's `avdiscard` capture option value.
    pub fn avdiscard(self) -> &'static str {
        match self {
            Discard::Nothing => "none",
            Discard::NonReference => "nonref",
            Discard::Bidirectional => "bidir",
            Discard::NonKey => "nonkey",
        }
    }

    /// How logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Discard::Nothing => "off",
            Discard::NonReference => "nonref",
            Discard::Bidirectional => "bidir",
            Discard::NonKey => "keyframes",
        }
    }
}

/// `auto` skips non-reference frames only when a sampling period spans at
/// least this many frames: with up to three consecutive non-reference frames
/// (x264's default B-frame count) every period then holds a decoded frame.
pub const MIN_FRAMES_PER_SAMPLE: f64 = 4.0;

impl DecodeSkip {
    /// What to discard before anything about the stream is known: the
    /// setting's own choice, and for `auto` the usual case (a camera faster
    /// than four times VIDEO_FPS), checked by [`DecodeSkip::decide`] once the
    /// stream is open.
    pub fn first_guess(self) -> Discard {
        match self {
            DecodeSkip::Auto | DecodeSkip::Nonref => Discard::NonReference,
            DecodeSkip::Off => Discard::Nothing,
            DecodeSkip::Keyframes => Discard::NonKey,
            DecodeSkip::Bidir => Discard::Bidirectional,
        }
    }

    /// Whether [`DecodeSkip::decide`] needs a keyframe probe of the file for
    /// this stream rate and sampling period.
    pub fn wants_probe(self, stream_fps: f64, period: f64) -> bool {
        self == DecodeSkip::Auto && skips_non_reference(stream_fps, period)
    }

    /// What to discard for a stream of `stream_fps` frames per second
    /// sampled every `period` seconds; `keyframes_cover` says whether every
    /// sampling period holding a frame holds a keyframe (known only for
    /// probed local files).
    pub fn decide(self, stream_fps: f64, period: f64, keyframes_cover: Option<bool>) -> Discard {
        match self {
            DecodeSkip::Off => Discard::Nothing,
            DecodeSkip::Nonref => Discard::NonReference,
            DecodeSkip::Keyframes => Discard::NonKey,
            DecodeSkip::Bidir => Discard::Bidirectional,
            DecodeSkip::Auto if !skips_non_reference(stream_fps, period) => Discard::Nothing,
            DecodeSkip::Auto if keyframes_cover == Some(true) => Discard::NonKey,
            DecodeSkip::Auto => Discard::NonReference,
        }
    }
}

fn skips_non_reference(stream_fps: f64, period: f64) -> bool {
    stream_fps.is_finite() && stream_fps > 0.0 && period * stream_fps >= MIN_FRAMES_PER_SAMPLE
}

/// Timestamps within this distance before a period's start count as in it
/// (as the sampler's tolerance).
const TOLERANCE_SECS: f64 = 0.000_5;

/// Whether every sampling period (`[k·period, (k+1)·period)`) that holds a
/// frame also holds a keyframe, given each frame's timestamp in seconds and
/// whether it is a keyframe, in any order. When it does, decoding keyframes
/// only gives a sample for exactly the periods a full decode does, each at
/// most one period later. Timestamps before 0 count as 0, as the capture's
/// clock does; ones that are not numbers are ignored.
pub fn keyframes_cover(frames: impl IntoIterator<Item = (f64, bool)>, period: f64) -> bool {
    if !(period.is_finite() && period > 0.0) {
        return false;
    }
    let mut with_frames = std::collections::BTreeSet::new();
    let mut with_keyframes = std::collections::BTreeSet::new();
    for (at, key) in frames {
        if !at.is_finite() {
            continue;
        }
        let slot = ((at.max(0.0) + TOLERANCE_SECS) / period).floor() as i64;
        with_frames.insert(slot);
        if key {
            with_keyframes.insert(slot);
        }
    }
    !with_frames.is_empty() && with_frames == with_keyframes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_skips_non_reference_frames_only_when_a_period_spans_four_frames() {
        let auto = DecodeSkip::Auto;
        assert_eq!(auto.decide(25.0, 0.5, None), Discard::NonReference);
        assert_eq!(
            auto.decide(25.0, 0.2, None),
            Discard::NonReference,
            "5 fps of 25"
        );
        assert_eq!(
            auto.decide(25.0, 0.1, None),
            Discard::Nothing,
            "10 fps of 25"
        );
        assert_eq!(auto.decide(10.0, 0.5, None), Discard::NonReference);
        assert_eq!(auto.decide(10.0, 0.2, None), Discard::Nothing);
        assert_eq!(
            auto.decide(25.0, 0.04, None),
            Discard::Nothing,
            "every frame"
        );
        for unknown in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                auto.decide(unknown, 0.5, None),
                Discard::Nothing,
                "{unknown}"
            );
        }
    }

    #[test]
    fn auto_decodes_keyframes_only_when_they_cover_every_period() {
        let auto = DecodeSkip::Auto;
        assert_eq!(auto.decide(25.0, 2.0, Some(true)), Discard::NonKey);
        assert_eq!(auto.decide(25.0, 2.0, Some(false)), Discard::NonReference);
        assert_eq!(
            auto.decide(25.0, 0.1, Some(true)),
            Discard::Nothing,
            "a period of fewer than four frames decodes every frame"
        );
        assert!(auto.wants_probe(25.0, 0.5));
        assert!(!auto.wants_probe(25.0, 0.1));
        assert!(!DecodeSkip::Nonref.wants_probe(25.0, 0.5));
    }

    #[test]
    fn fixed_settings_are_what_they_say() {
        for (fps, period) in [(25.0, 0.5), (10.0, 0.04), (f64::NAN, 1.0)] {
            assert_eq!(
                DecodeSkip::Off.decide(fps, period, Some(true)),
                Discard::Nothing
            );
            assert_eq!(
                DecodeSkip::Nonref.decide(fps, period, None),
                Discard::NonReference
            );
            assert_eq!(
                DecodeSkip::Keyframes.decide(fps, period, Some(false)),
                Discard::NonKey
            );
            assert_eq!(
                DecodeSkip::Bidir.decide(fps, period, Some(true)),
                Discard::Bidirectional,
                "never chosen by auto, always by bidir"
            );
        }
        for mode in [
            DecodeSkip::Off,
            DecodeSkip::Nonref,
            DecodeSkip::Keyframes,
            DecodeSkip::Bidir,
        ] {
            assert_eq!(mode.first_guess(), mode.decide(25.0, 0.5, None));
        }
        assert_eq!(DecodeSkip::Auto.first_guess(), Discard::NonReference);
        assert_eq!(Discard::NonKey.avdiscard(), "nonkey");
        assert_eq!(Discard::Bidirectional.avdiscard(), "bidir");
    }

    /// Frames at `fps` for `seconds`, a keyframe every `gop` frames.
    fn stream(fps: f64, seconds: f64, gop: usize) -> Vec<(f64, bool)> {
        (0..(fps * seconds) as usize)
            .map(|i| (i as f64 / fps, i % gop == 0))
            .collect()
    }

    #[test]
    fn keyframes_cover_periods_at_least_as_long_as_the_gop() {
        // 25 fps, a keyframe every 2 s: one per period of 2 s or more.
        assert!(keyframes_cover(stream(25.0, 80.0, 50), 2.0));
        assert!(keyframes_cover(stream(25.0, 80.0, 50), 4.0));
        assert!(!keyframes_cover(stream(25.0, 80.0, 50), 1.0));
        assert!(!keyframes_cover(stream(25.0, 80.0, 50), 0.5));
        // A keyframe every 12 frames (0.48 s) at VIDEO_FPS=2.
        assert!(keyframes_cover(stream(25.0, 80.0, 12), 0.5));
    }

    #[test]
    fn a_tail_without_a_keyframe_in_its_own_period_is_not_covered() {
        // 81 s: the last period, [80, 82), holds frames but no keyframe.
        let mut frames = stream(25.0, 80.0, 50);
        frames.push((80.0, false));
        frames.push((80.04, false));
        assert!(!keyframes_cover(frames.clone(), 2.0));
        frames.push((80.08, true));
        assert!(keyframes_cover(frames, 2.0));
    }

    #[test]
    fn order_negative_and_broken_timestamps() {
        // Decode order with a B-frame's stamp before 0 (a negative DTS).
        let frames = [
            (-0.08, true),
            (0.12, false),
            (0.04, false),
            (0.5, true),
            (f64::NAN, false),
        ];
        assert!(keyframes_cover(frames, 0.5));
        assert!(!keyframes_cover(
            [(0.1, false), (0.0, true), (0.6, false)],
            0.5
        ));
        assert!(!keyframes_cover([], 0.5), "nothing seen");
        assert!(!keyframes_cover([(0.0, true)], 0.0));
    }
}
