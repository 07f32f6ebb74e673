//! Link options of the `runner` binary.
//!
//! Relative relocations are packed (`-z pack-relative-relocs`, glibc ≥ 2.36):
//! the binary carries OpenCV and FFmpeg, whose pointer tables would otherwise
//! need about 1.5 MB of relocation records read at every start, the
//! controller's and `runner --help`'s included.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
