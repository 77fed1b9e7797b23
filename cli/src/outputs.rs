//! The output files of a command, written all or none.
//!
//! Each output is created up front as a temporary file in its target's folder, so a missing,
//! read-only or mistyped folder fails before the computation; the results are written to the
//! temporary files, which are renamed onto their targets only once all are written. A failure
//! anywhere (or an early return, or a panic) removes the temporary files and the folders made
//! for the outputs, leaving no partial set behind.
//!
//! A target that exists must be a regular file, which the output then replaces. Anything else
//! is refused before the computation, by what it is: a rename would replace a device (as root,
//! `/dev/null` itself), a FIFO or a symbolic link with a regular file, and writing through them
//! instead would give up all-or-none. Symbolic links are refused rather than followed: name
//! the file the link points to.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use xattn::DType;

use crate::npy::write_npy;
use crate::{file_kind, CliError, CliResult};

/// One output: the flag naming it, its target, its temporary file, and whether it is written.
struct Output {
    flag: &'static str,
    target: PathBuf,
    temp: PathBuf,
    written: bool,
    /// The temporary file's registration for removal on a signal.
    on_signal: Option<on_signal::Registered>,
}

/// The outputs of one command, created by [`Outputs::create`], committed by
/// [`Outputs::commit`]; dropped uncommitted, they leave nothing behind.
pub struct Outputs {
    outputs: Vec<Output>,
    /// Folders created for outputs, deepest first: removed again (when empty) unless committed.
    folders: Vec<PathBuf>,
}

/// Why the existing `target` of `flag` cannot be an output, if it cannot: it is not a
/// regular file.
fn refuse_existing(flag: &str, target: &Path) -> Result<(), String> {
    let meta = match fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot check what is there: {e}")),
    };
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    if t.is_dir() && flag == "--heatmap" {
        return Err("a folder is where this map goes; move it away".into());
    }
    if t.is_dir() {
        return Err("it is a folder; give a file name".into());
    }
    let kind = file_kind(t);
    let fix = if t.is_symlink() {
        let to = fs::read_link(target)
            .map(|to| format!(" to {}", to.display()))
            .unwrap_or_default();
        format!(
            "it is {kind}{to}; xattn does not write outputs through links (each output \
             replaces its target whole): give the path of the file itself, or remove the link"
        )
    } else {
        let skip = if flag == "--out" || flag == "--heatmap" {
            String::new()
        } else {
            format!(" (or leave {flag} out to skip that output)")
        };
        format!(
            "it is {kind}, not a regular file; xattn replaces each output whole (a temporary \
             file renamed onto it), which would replace {kind} with a file: give a file \
             path{skip}"
        )
    };
    Err(fix)
}

/// Removal of the temporary files when the process is interrupted (SIGINT, SIGTERM, SIGHUP):
/// the handler unlinks them (and, should the signal come in the middle of the commit, the
/// targets already renamed, as a failed commit does), then dies of the same signal as it
/// would have. SIGKILL cannot be caught; a run killed by it leaves its
/// `.<name>.xattn-<pid>.tmp` files behind.
///
/// Async-signal-safe by construction: the paths are C strings in a list that only grows (its
/// nodes are leaked, never freed, so a handler running on any thread never reads freed
/// memory), their states are atomics, and the handler calls only `unlink`, `signal` and
/// `raise`.
#[cfg(unix)]
mod on_signal {
    use std::ffi::{c_char, c_int, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering};
    use std::sync::Once;

    extern "C" {
        fn signal(signum: c_int, handler: usize) -> usize;
        fn raise(sig: c_int) -> c_int;
        fn unlink(path: *const c_char) -> c_int;
    }

    const SIGHUP: c_int = 1;
    const SIGINT: c_int = 2;
    const SIGTERM: c_int = 15;
    const SIG_DFL: usize = 0;

    /// The temporary file exists: the handler removes it.
    const TEMP: u8 = 0;
    /// Being renamed onto its target, in a commit not yet finished: the handler removes the
    /// temporary file and the target, whichever exists.
    const RENAMED: u8 = 1;
    /// Committed or removed: the handler leaves both alone.
    const DONE: u8 = 2;

    struct Node {
        temp: CString,
        target: CString,
        state: AtomicU8,
        next: *mut Node,
    }

    static HEAD: AtomicPtr<Node> = AtomicPtr::new(null_mut());
    static INSTALL: Once = Once::new();

    extern "C" fn handler(sig: c_int) {
        let mut node = HEAD.load(Ordering::Acquire);
        // SAFETY: nodes are leaked, so every pointer in the list stays valid.
        while let Some(n) = unsafe { node.as_ref() } {
            let paths: [Option<&CString>; 2] = match n.state.load(Ordering::Acquire) {
                TEMP => [Some(&n.temp), None],
                RENAMED => [Some(&n.temp), Some(&n.target)],
                _ => [None, None],
            };
            for path in paths.into_iter().flatten() {
                // SAFETY: a NUL-terminated path.
                unsafe { unlink(path.as_ptr()) };
            }
            node = n.next;
        }
        // SAFETY: restoring the default action and raising the signal again ends the process
        // as the signal would have.
        unsafe {
            signal(sig, SIG_DFL);
            raise(sig);
        }
    }

    /// An output whose temporary file (then target) the handler removes until it is done.
    pub struct Registered(&'static Node);

    impl Registered {
        /// The temporary file is about to be renamed onto the target, in a commit.
        pub fn renaming(&self) {
            self.0.state.store(RENAMED, Ordering::Release);
        }

        /// The rename failed: the temporary file is still there, the target is not ours.
        pub fn not_renamed(&self) {
            self.0.state.store(TEMP, Ordering::Release);
        }

        /// The output is committed, or its temporary file removed: nothing left to remove.
        pub fn done(&self) {
            self.0.state.store(DONE, Ordering::Release);
        }
    }

    /// Registers the output `target` written to `temp` (installing the handler on first use).
    pub fn register(temp: &Path, target: &Path) -> Option<Registered> {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).ok();
        let (temp, target) = (c(temp)?, c(target)?);
        INSTALL.call_once(|| {
            let h = handler as extern "C" fn(c_int) as usize;
            for sig in [SIGHUP, SIGINT, SIGTERM] {
                // SAFETY: installs a handler that is async-signal-safe (see the module docs).
                unsafe { signal(sig, h) };
            }
        });
        let node: &'static mut Node = Box::leak(Box::new(Node {
            temp,
            target,
            state: AtomicU8::new(TEMP),
            next: null_mut(),
        }));
        let mut head = HEAD.load(Ordering::Acquire);
        loop {
            node.next = head;
            match HEAD.compare_exchange(head, node, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => head = now,
            }
        }
        Some(Registered(node))
    }
}

/// Where signals are not caught, temporary files are removed on every error path only.
#[cfg(not(unix))]
mod on_signal {
    pub struct Registered;
    impl Registered {
        pub fn renaming(&self) {}
        pub fn not_renamed(&self) {}
        pub fn done(&self) {}
    }
    pub fn register(_: &std::path::Path, _: &std::path::Path) -> Option<Registered> {
        None
    }
}

impl Outputs {
    /// Checks each `(flag, target)` given and creates its temporary file next to it.
    pub fn create(targets: &[(&'static str, Option<&PathBuf>)]) -> CliResult<Self> {
        let mut outputs = Self {
            outputs: Vec::new(),
            folders: Vec::new(),
        };
        for &(flag, target) in targets {
            if let Some(target) = target {
                outputs.add(flag, target)?;
            }
        }
        Ok(outputs)
    }

    /// Creates the folder `dir` (and any missing folder above it) for the outputs of `flag`;
    /// the folders made are removed again, when left empty, unless the outputs are committed.
    pub fn create_dir(&mut self, flag: &str, dir: &Path) -> CliResult<()> {
        let fail =
            |why: String| CliError::new(format!("cannot create {flag} {}: {why}", dir.display()));
        match fs::symlink_metadata(dir) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            // A link to a folder is a folder to write into: the files there are replaced.
            Ok(meta) if meta.file_type().is_symlink() && dir.is_dir() => return Ok(()),
            Ok(meta) => {
                return Err(fail(format!(
                    "it is {}, not a folder; give a folder (created if missing)",
                    file_kind(meta.file_type())
                )))
            }
            Err(_) => {}
        }
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .take_while(|a| fs::symlink_metadata(a).is_err())
            .map(Path::to_path_buf)
            .collect();
        fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        self.folders.extend(missing);
        Ok(())
    }

    /// Adds the output `target` of `flag`: checks it and creates its temporary file.
    pub fn add(&mut self, flag: &'static str, target: &Path) -> CliResult<()> {
        let fail =
            |why: String| CliError::new(format!("cannot write {flag} {}: {why}", target.display()));
        if let Some(other) = self.outputs.iter().find(|o| o.target == target) {
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
        refuse_existing(flag, target).map_err(fail)?;
        let Some(name) = target.file_name().map(|n| n.to_string_lossy()) else {
            return Err(fail("it is a folder; give a file name".into()));
        };
        let temp = folder.join(format!(".{name}.xattn-{}.tmp", std::process::id()));
        File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| fail(format!("cannot create a file in {}: {e}", folder.display())))?;
        let on_signal = on_signal::register(&temp, target);
        self.outputs.push(Output {
            flag,
            target: target.to_path_buf(),
            temp,
            written: false,
            on_signal,
        });
        Ok(())
    }

    /// The temporary file of the output `target` (one added before), opened for writing once.
    fn open(&mut self, target: &Path) -> CliResult<File> {
        let output = self
            .outputs
            .iter_mut()
            .find(|o| o.target == target && !o.written)
            .expect("each output is created once and written once");
        output.written = true;
        File::options()
            .write(true)
            .truncate(true)
            .open(&output.temp)
            .map_err(|e| {
                CliError::new(format!(
                    "writing {} {} failed: {e}",
                    output.flag,
                    target.display()
                ))
            })
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
        let file = self.open(target)?;
        match dtype {
            DType::F16 => {
                let halves: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                write_npy(file, target, &halves, shape)
            }
            DType::F32 | DType::Bf16 => write_npy(file, target, data, shape),
        }
    }

    /// Writes `bytes` as the output `target` (one added before), as they are.
    pub fn write_bytes(&mut self, target: &Path, bytes: &[u8]) -> CliResult<()> {
        let mut file = self.open(target)?;
        file.write_all(bytes)
            .and_then(|()| file.flush())
            .map_err(|e| CliError::new(format!("writing {} failed: {e}", target.display())))
    }

    /// Moves every written output onto its target. Should a move fail, the targets already
    /// moved are removed again, so that no partial set of outputs remains.
    pub fn commit(mut self) -> CliResult<()> {
        assert!(
            self.outputs.iter().all(|o| o.written),
            "every output is written before the commit"
        );
        for (i, output) in self.outputs.iter().enumerate() {
            // Marked before the rename: a signal from here to the end of the commit removes
            // this output whichever side of the rename it comes.
            if let Some(r) = &output.on_signal {
                r.renaming();
            }
            if let Err(e) = fs::rename(&output.temp, &output.target) {
                if let Some(r) = &output.on_signal {
                    r.not_renamed();
                }
                for done in &self.outputs[..i] {
                    let _ = fs::remove_file(&done.target);
                }
                return Err(CliError::new(format!(
                    "writing {} {} failed: {e}",
                    output.flag,
                    output.target.display()
                )));
            }
        }
        for output in &self.outputs {
            if let Some(r) = &output.on_signal {
                r.done();
            }
        }
        self.outputs.clear();
        self.folders.clear();
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for output in &self.outputs {
            let _ = fs::remove_file(&output.temp);
            if let Some(r) = &output.on_signal {
                r.done();
            }
        }
        // Deepest first; a folder something else was put into meanwhile stays.
        for folder in &self.folders {
            let _ = fs::remove_dir(folder);
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

    #[test]
    fn folders_made_for_outputs_go_again_unless_committed() {
        let dir = folder("folders");
        let maps = dir.join("a").join("maps");
        let png = maps.join("b0_mean.png");
        let mut outs = Outputs::create(&[]).unwrap();
        outs.create_dir("--heatmap", &maps).unwrap();
        outs.add("--heatmap", &png).unwrap();
        outs.write_bytes(&png, b"png").unwrap();
        drop(outs);
        assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));
        let mut outs = Outputs::create(&[]).unwrap();
        outs.create_dir("--heatmap", &maps).unwrap();
        outs.add("--heatmap", &png).unwrap();
        outs.write_bytes(&png, b"png").unwrap();
        outs.commit().unwrap();
        assert_eq!(fs::read(&png).unwrap(), b"png");
        assert_eq!(entries(&maps), ["b0_mean.png"]);
        // A file where the folder goes is named as what it is.
        let e = Outputs::create(&[])
            .unwrap()
            .create_dir("--heatmap", &png)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a regular file, not a folder"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_is_refused_and_kept() {
        let dir = folder("link");
        let (real, link) = (dir.join("real"), dir.join("o.npy"));
        fs::write(&real, "keep").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = Outputs::create(&[("--out", Some(&link))])
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("a symbolic link to"), "{e}");
        assert_eq!(entries(&dir), ["o.npy", "real"]);
        assert_eq!(fs::read_to_string(&link).unwrap(), "keep");
        fs::remove_dir_all(&dir).unwrap();
    }
}
