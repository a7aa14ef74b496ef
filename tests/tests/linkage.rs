//! The deployable binaries need only what the runtime image (distroless `cc-debian12`: glibc and libgcc)
//! provides. A `libz.so.1` in the NEEDED entries crashes the pod at start (rust-rdkafka issue 719).
//! Checked on the binaries `make test` built; the release build links the same libraries.

use e2e::bins::bin;

/// Shared libraries of glibc and libgcc, which every glibc-based distroless image carries.
const RUNTIME_IMAGE_LIBRARIES: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
];

/// The NEEDED entries of the ELF file at `path`.
fn needed(path: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let elf = goblin::elf::Elf::parse(&bytes)
        .unwrap_or_else(|e| panic!("{} is not ELF: {e}", path.display()));
    elf.libraries.iter().map(|l| l.to_string()).collect()
}

#[test]
fn image_binaries_need_only_the_runtime_images_libraries() {
    for name in [
        "outbox-operator",
        "outbox-relay",
        "demo-consumer",
        "demo-api",
    ] {
        let path = bin(name).unwrap();
        let libraries = needed(&path);
        assert!(
            libraries.iter().any(|l| l == "libc.so.6"),
            "{name}: NEEDED {libraries:?} has no libc (not a dynamically linked glibc binary?)"
        );
        let foreign: Vec<&String> = libraries
            .iter()
            .filter(|l| !RUNTIME_IMAGE_LIBRARIES.contains(&l.as_str()))
            .collect();
        assert!(
            foreign.is_empty(),
            "{name} needs {foreign:?}, which the distroless runtime image does not carry (all NEEDED: {libraries:?})"
        );
    }
}
