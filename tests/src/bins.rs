//! Where the product's binaries are: next to this executable (cargo puts every binary of the workspace
//! in one target directory), or in `OUTBOX_BIN_DIR`.

use std::path::PathBuf;

use anyhow::bail;

/// The path of binary `name`; an error says how to build it when it is missing.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("OUTBOX_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
            // Test executables live in target/<profile>/deps.
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the binaries first (`cargo build --workspace --bins`; `make test` and `make demo` do)",
            path.display()
        );
    }
    Ok(path)
}
