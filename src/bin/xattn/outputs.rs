//! The output files of a command, written all or none.
//!
//! Each output is created up front as a temporary file in its target's folder, so a missing,
//! read-only or mistyped folder fails before the computation; the results are written to the
//! temporary files, which are renamed onto their targets only once all are written. A failure
//! anywhere (or an early return) removes the temporary files, leaving no partial set behind.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use xattn::DType;

use crate::npy::write_npy;
use crate::{CliError, CliResult};

/// One output: the flag naming it, its target, its temporary file (open until written).
struct Output {
    flag: &'static str,
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

/// The outputs of one command, created by [`Outputs::create`], committed by
/// [`Outputs::commit`]; dropped uncommitted, they leave nothing behind.
pub struct Outputs(Vec<Output>);

impl Outputs {
    /// Checks each `(flag, target)` given and creates its temporary file next to it.
    pub fn create(targets: &[(&'static str, Option<&PathBuf>)]) -> CliResult<Self> {
        let mut outputs = Self(Vec::new());
        for &(flag, target) in targets {
            if let Some(target) = target {
                outputs.add(flag, target)?;
            }
        }
        Ok(outputs)
    }

    fn add(&mut self, flag: &'static str, target: &Path) -> CliResult<()> {
        let fail =
            |why: String| CliError::new(format!("cannot write {flag} {}: {why}", target.display()));
        if let Some(other) = self.0.iter().find(|o| o.target == target) {
            return Err(fail(format!(
                "{} writes it too; give each output its own file",
                other.flag
            )));
        }
        let folder = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !folder.exists() {
            return Err(fail(format!("folder {} does not exist", folder.display())));
        }
        if !folder.is_dir() {
            return Err(fail(format!(
                "{} is a file, not a folder",
                folder.display()
            )));
        }
        let name = match target.file_name() {
            Some(name) if !target.is_dir() => name.to_string_lossy(),
            _ => return Err(fail("it is a folder; give a file name".into())),
        };
        let temp = folder.join(format!(".{name}.xattn-{}.tmp", std::process::id()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| fail(format!("cannot create a file in {}: {e}", folder.display())))?;
        self.0.push(Output {
            flag,
            target: target.to_path_buf(),
            temp,
            file: Some(file),
        });
        Ok(())
    }

    /// Writes `data` of shape `shape` as the output `target` (one given to [`Outputs::create`]),
    /// as float32.
    pub fn write(&mut self, target: &Path, data: &[f32], shape: &[usize]) -> CliResult<()> {
        self.write_as(target, data, shape, DType::F32)
    }

    /// [`Outputs::write`] of a tensor stored as `dtype`, whose values `data` holds widened:
    /// float16 for f16 (narrowed back exactly), float32 otherwise (numpy has no bfloat16).
    pub fn write_as(
        &mut self,
        target: &Path,
        data: &[f32],
        shape: &[usize],
        dtype: DType,
    ) -> CliResult<()> {
        let output = self
            .0
            .iter_mut()
            .find(|o| o.target == target && o.file.is_some())
            .expect("each output is created once and written once");
        let file = output.file.take().expect("found open");
        match dtype {
            DType::F16 => {
                let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                write_npy(file, target, &halves, shape)
            }
            DType::F32 | DType::Bf16 => write_npy(file, target, data, shape),
        }
    }

    /// Moves every written output onto its target. Should a move fail, the targets already
    /// moved are removed again, so that no partial set of outputs remains.
    pub fn commit(mut self) -> CliResult<()> {
        assert!(
            self.0.iter().all(|o| o.file.is_none()),
            "every output is written before the commit"
        );
        for (i, output) in self.0.iter().enumerate() {
            if let Err(e) = fs::rename(&output.temp, &output.target) {
                for done in &self.0[..i] {
                    let _ = fs::remove_file(&done.target);
                }
                return Err(CliError::new(format!(
                    "writing {} {} failed: {e}",
                    output.flag,
                    output.target.display()
                )));
            }
        }
        self.0.clear();
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for output in &self.0 {
            let _ = fs::remove_file(&output.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temp folder.
    fn folder(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xattn-outputs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn committed_outputs_replace_their_targets_and_nothing_else_remains() {
        let dir = folder("commit");
        let (a, b) = (dir.join("a.npy"), dir.join("b.npy"));
        fs::write(&a, "old").unwrap();
        let mut outs = Outputs::create(&[("--out", Some(&a)), ("--lse", Some(&b))]).unwrap();
        outs.write(&a, &[1.0, 2.0], &[2]).unwrap();
        outs.write(&b, &[3.0], &[1]).unwrap();
        outs.commit().unwrap();
        assert_eq!(entries(&dir), ["a.npy", "b.npy"]);
        assert_ne!(fs::read(&a).unwrap(), b"old");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failure_leaves_no_output_and_no_temporary_file() {
        let dir = folder("fail");
        let (a, b) = (dir.join("a.npy"), dir.join("b.npy"));
        // Dropped after one write, as when the second result fails.
        let mut outs = Outputs::create(&[("--out", Some(&a)), ("--lse", Some(&b))]).unwrap();
        outs.write(&a, &[1.0], &[1]).unwrap();
        drop(outs);
        assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));
        // A move that fails (b became a folder meanwhile) takes back the moves before it.
        let mut outs = Outputs::create(&[("--out", Some(&a)), ("--lse", Some(&b))]).unwrap();
        outs.write(&a, &[1.0], &[1]).unwrap();
        outs.write(&b, &[2.0], &[1]).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(b.join("x"), "").unwrap();
        let e = outs.commit().unwrap_err().to_string();
        assert!(e.contains("--lse"), "{e}");
        assert_eq!(
            entries(&dir),
            ["b.npy"],
            "only the folder in the way remains"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_targets_fail_up_front_with_what_is_wrong() {
        let dir = folder("bad");
        let file = dir.join("q.npy");
        fs::write(&file, "").unwrap();
        let err = |out: PathBuf, lse: Option<PathBuf>| {
            Outputs::create(&[("--out", Some(&out)), ("--lse", lse.as_ref())])
                .err()
                .expect("fails")
                .to_string()
        };
        let e = err(file.join("o.npy"), None);
        assert!(e.contains("q.npy is a file, not a folder"), "{e}");
        let e = err(dir.join("none").join("o.npy"), None);
        assert!(e.contains("does not exist"), "{e}");
        let e = err(dir.clone(), None);
        assert!(e.contains("it is a folder"), "{e}");
        let e = err(dir.join("o.npy"), Some(dir.join("o.npy")));
        assert!(e.contains("--out writes it too"), "{e}");
        assert_eq!(entries(&dir), ["q.npy"], "no temporary file remains");
        fs::remove_dir_all(&dir).unwrap();
    }
}
