#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        vap_runner_fuzz::properties::ffmpeg_log(text);
    }
});
