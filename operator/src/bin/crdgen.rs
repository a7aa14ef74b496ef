//! `crdgen [DIR…]`: writes the CRDs to each `DIR` (default: `crds/` and the Helm chart's
//! `charts/outbox-operator-crds/files/crds/`, which `templates/crds.yaml` renders). Never edit those files by hand.

fn main() -> anyhow::Result<()> {
    let mut dirs: Vec<String> = std::env::args().skip(1).collect();
    if dirs.is_empty() {
        dirs = vec![
            "crds".into(),
            "charts/outbox-operator-crds/files/crds".into(),
        ];
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir)?;
        for (name, yaml) in operator::crd::crd_files() {
            let path = std::path::Path::new(&dir).join(name);
            std::fs::write(&path, yaml)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
