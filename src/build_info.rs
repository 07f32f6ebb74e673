//! What `runner --version` says about the video stack linked into the
//! binary: OpenCV's version, its modules and video backends (with the FFmpeg
//! library versions), and the cache key of the build recipe (`scripts/opencv
//! key`) when the binary was built through it.

/// The recipe key `scripts/opencv env` exported at build time, if any.
pub const OPENCV_BUILD: Option<&str> = option_env!("VAP_OPENCV_BUILD");

/// The multi-line text after `runner <version>` in `runner --version`.
pub fn long_version() -> String {
    let info = opencv::core::get_build_information().unwrap_or_default();
    describe(env!("CARGO_PKG_VERSION"), OPENCV_BUILD, &info)
}

/// Renders the version text from OpenCV's build information
/// (`cv::getBuildInformation()`): the OpenCV version, the modules built,
/// and every video I/O backend that is on, with its details.
pub fn describe(version: &str, recipe: Option<&str>, build_information: &str) -> String {
    let mut opencv_version = "unknown";
    let mut modules = "unknown";
    let mut video = Vec::new();
    let mut in_video = false;
    for line in build_information.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("General configuration for OpenCV ") {
            opencv_version = rest.split_whitespace().next().unwrap_or(opencv_version);
        } else if let Some(rest) = trimmed.strip_prefix("To be built:") {
            modules = rest.trim();
        } else if trimmed == "Video I/O:" {
            in_video = true;
        } else if in_video {
            // The section ends at the next heading, indented as "Video I/O:" is.
            if indent(line) <= 2 {
                in_video = false;
            } else if let Some((name, value)) = trimmed.split_once(':')
                && let Some(detail) = value.trim().strip_prefix("YES")
            {
                video.push(format!("{name} {}", detail.trim()).trim_end().to_string());
            }
        }
    }
    let recipe = recipe.map_or_else(
        || "system OpenCV (not built by scripts/opencv)".to_string(),
        |key| format!("built by scripts/opencv as {key}"),
    );
    let video = if video.is_empty() {
        "none".to_string()
    } else {
        video.join(", ")
    };
    format!(
        "{version}\nOpenCV {opencv_version}, {recipe}\n  modules: {modules}\n  video I/O: {video}"
    )
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "
General configuration for OpenCV 4.10.0 =====================================
  Version control:               unknown

  OpenCV modules:
    To be built:                 calib3d core dnn features2d flann imgcodecs imgproc objdetect videoio
    Disabled:                    world

  Video I/O:
    FFMPEG:                      YES
      avcodec:                   YES (59.37.100)
      avformat:                  YES (59.27.100)
      avresample:                NO
    v4l/v4l2:                    NO

  Parallel framework:            pthreads
";

    #[test]
    fn names_opencv_modules_and_the_video_backends_that_are_on() {
        let text = describe("0.1.0", Some("ffmpeg-5.1.9-opencv-4.10.0-abc"), INFO);
        assert_eq!(
            text,
            "0.1.0\n\
             OpenCV 4.10.0, built by scripts/opencv as ffmpeg-5.1.9-opencv-4.10.0-abc\n  \
             modules: calib3d core dnn features2d flann imgcodecs imgproc objdetect videoio\n  \
             video I/O: FFMPEG, avcodec (59.37.100), avformat (59.27.100)"
        );
    }

    #[test]
    fn says_when_the_binary_uses_a_system_opencv_or_reads_nothing() {
        let text = describe("0.1.0", None, "");
        assert!(text.contains("OpenCV unknown, system OpenCV"), "{text}");
        assert!(text.ends_with("video I/O: none"), "{text}");
    }
}
