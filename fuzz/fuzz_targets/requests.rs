#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vap_runner_fuzz::properties::requests(data);
});
