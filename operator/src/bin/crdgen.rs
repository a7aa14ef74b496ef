//! `crdgen [DIR]`: writes the CRDs to `DIR` (default `crds/`). Never edit those files by hand.

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "crds".into());
    std::fs::create_dir_all(&dir)?;
    for (name, yaml) in operator::crd::crd_files() {
        let path = std::path::Path::new(&dir).join(name);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
