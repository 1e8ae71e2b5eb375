//! Coverage-guided fuzz targets for cowdisk (issue 10), one module per target; the
//! binaries in `src/bin/` hand AFL++'s inputs to [`header::run`] and the others. The
//! targets use only the public API of cowdisk-core (with its `sim` feature) and
//! cowdisk-nbd, and keep every input-driven size small (see each module), so no input
//! can make the harness itself hang or run out of memory.
//!
//! | target | module | what one input is |
//! |---|---|---|
//! | F1 `header` | [`header`] | one header slot |
//! | F2 `layer` | [`layer`] | one layer file (sparse, checksums re-sealed on request) |
//! | F3 `chain` | [`chain`] | up to four layer files, bottom first |
//! | F4 `nbd` | [`nbd`] | the bytes one NBD client sends |
//! | F5 `model` | [`model`] | requests against a chain, then a power loss |
#![forbid(unsafe_code)]

pub mod chain;
pub mod header;
pub mod image;
pub mod input;
pub mod layer;
pub mod model;
pub mod nbd;
pub mod start;
pub mod walk;

#[cfg(test)]
mod tests {
    //! The committed seeds pass every target (a failing seed would stop AFL at once),
    //! and the image seeds really open, so fuzzing starts past the checksums.
    use std::path::PathBuf;
    use std::sync::Arc;

    use cowdisk_core::sim::SimWorld;
    use cowdisk_core::{Access, Disk, Storage};

    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target);
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .map(|p| {
                let b = std::fs::read(&p).expect("read seed");
                (p, b)
            })
            .collect();
        v.sort();
        assert!(!v.is_empty(), "no seeds for {target}");
        v
    }

    #[test]
    fn every_seed_passes_its_target() {
        let targets: [(&str, fn(&[u8])); 5] = [
            ("header", crate::header::run),
            ("layer", crate::layer::run),
            ("chain", crate::chain::run),
            ("nbd", crate::nbd::run),
            ("model", crate::model::run),
        ];
        for (t, run) in targets {
            for (p, b) in seeds(t) {
                println!("{}", p.display());
                run(&b);
            }
        }
    }

    #[test]
    fn layer_seeds_open() {
        for (p, b) in seeds("layer") {
            let mut inp = crate::input::Input::new(&b);
            let mut l = crate::image::decode(&mut inp);
            crate::image::fix(&mut l.image, l.flags, None);
            let st: Arc<dyn Storage> = SimWorld::new().from_bytes(l.image);
            let res = Disk::open_storages((st, "t".into()), Vec::new(), Access::ReadOnly);
            assert!(res.is_ok(), "{}: {:?}", p.display(), res.err());
        }
    }
}
