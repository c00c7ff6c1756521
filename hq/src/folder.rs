//! Reading stack files from paths, and the deployment folder `<dir>/<stack>/<job>.yaml`.

use std::path::{Path, PathBuf};

use schema::{JobName, StackName};

use crate::compile::JobSpec;
use crate::stackfile::{self, JobOut, StackFile};
use crate::store::HqError;

/// File names `viking deploy DIR` looks for, in order.
pub const STACK_FILE_NAMES: [&str; 4] = ["stack.yml", "stack.yaml", "stack.json", "viking.yml"];

/// The stack file of `path` (a file, or a directory holding one of [`STACK_FILE_NAMES`]) and
/// the stack name it gets without `--name`: the directory's name for `DIR` or `DIR/stack.yml`,
/// else the file's stem.
pub fn locate(path: &Path) -> Result<(PathBuf, String), HqError> {
    if path.is_dir() {
        let file = STACK_FILE_NAMES
            .iter()
            .map(|n| path.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                HqError::Input(format!(
                    "{} has no stack file; expected one of {}",
                    path.display(),
                    STACK_FILE_NAMES.join(", ")
                ))
            })?;
        let name = dir_name(path);
        return Ok((file, name));
    }
    if !path.is_file() {
        return Err(HqError::Input(format!(
            "{} does not exist; give a stack file or a directory that holds one",
            path.display()
        )));
    }
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = if STACK_FILE_NAMES.contains(&file_name) {
        dir_name(path.parent().unwrap_or(Path::new(".")))
    } else {
        path.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned()
    };
    Ok((path.to_path_buf(), name))
}

fn dir_name(dir: &Path) -> String {
    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    abs.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned()
}

/// Reads and parses the stack at `path`, named `name` (checked).
pub fn read_stack(path: &Path, name: &str) -> Result<StackFile, HqError> {
    let name = StackName::new(name)
        .map_err(|e| HqError::Input(format!("{e}; pass --name to choose the stack name")))?;
    let (file, _) = locate(path)?;
    let text = read_small(&file)?;
    let display = file.display().to_string();
    let parsed =
        stackfile::parse(name, &display, &text).map_err(|e| HqError::Input(e.to_string()))?;
    Ok(stackfile::resolve_stack(parsed))
}

/// The largest stack or job file read: a deploy is one etcd request, which etcd caps at
/// 1.5 MiB by default (`--max-request-bytes`).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a file people wrote, refusing one too big to be a stack file before anything else.
fn read_small(file: &Path) -> Result<String, HqError> {
    let io = |e: std::io::Error| HqError::Input(format!("cannot read {}: {e}", file.display()));
    let size = std::fs::metadata(file).map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(HqError::Input(format!(
            "{} is {size} bytes; a stack file is at most {MAX_FILE_BYTES} bytes (a deploy is one \
             etcd request, which etcd caps at 1.5 MiB): is it the right file?",
            file.display()
        )));
    }
    std::fs::read_to_string(file).map_err(io)
}

/// Writes `<dir>/<stack>/<job>.yaml` for each job, in the stack-file shape.
///
/// Job files hold env values, secrets among them: each is written 0600, in a stack folder
/// that only its owner may enter (0700, also when it existed already).
pub fn export(dir: &Path, stack: &StackName, jobs: &[JobSpec]) -> Result<Vec<PathBuf>, HqError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let stack_dir = dir.join(stack.as_str());
    let refused = |what: &str, p: &Path, e: std::io::Error| {
        HqError::Refused(format!("cannot {what} {}: {e}", p.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&stack_dir)
        .map_err(|e| refused("create", &stack_dir, e))?;
    std::fs::set_permissions(&stack_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| refused("restrict", &stack_dir, e))?;
    let mut written = Vec::new();
    for job in jobs {
        let out = JobOut::of(job);
        let text = serde_saphyr::to_string(&out)
            .map_err(|e| HqError::Refused(format!("cannot write job {}: {e}", job.job)))?;
        let path = stack_dir.join(format!("{}.yaml", job.job));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| refused("write", &path, e))?;
        // An existing file keeps its mode on open: restrict it before the values go in.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| refused("restrict", &path, e))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(|e| refused("write", &path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Reads a deployment folder: one stack per subdirectory, one job per `.yaml`/`.yml`/`.json`.
pub fn read_folder(dir: &Path) -> Result<Vec<StackFile>, HqError> {
    let io =
        |p: &Path, e: std::io::Error| HqError::Input(format!("cannot read {}: {e}", p.display()));
    let mut stacks = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for stack_dir in entries {
        let dir_text = stack_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let stack = StackName::new(dir_text)
            .map_err(|e| HqError::Input(format!("{}: {e}", stack_dir.display())))?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&stack_dir)
            .map_err(|e| io(&stack_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        let mut jobs = Vec::new();
        let mut all_text = String::new();
        for file in files {
            let stem = file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let job = JobName::new(stem)
                .map_err(|e| HqError::Input(format!("{}: {e}", file.display())))?;
            let text = read_small(&file)?;
            let def = stackfile::parse_job_file(&stack, &job, &file.display().to_string(), &text)
                .map_err(|e| HqError::Input(e.to_string()))?;
            all_text.push_str(&format!("{stem}\n{text}\n"));
            jobs.push(def);
        }
        if jobs.is_empty() {
            return Err(HqError::Input(format!(
                "{} holds no job files (<job>.yaml)",
                stack_dir.display()
            )));
        }
        stacks.push(StackFile {
            name: stack,
            path: stack_dir.display().to_string(),
            digest: stackfile::digest(&all_text),
            jobs,
        });
    }
    if stacks.is_empty() {
        return Err(HqError::Input(format!(
            "{} holds no stack folders (<dir>/<stack>/<job>.yaml)",
            dir.display()
        )));
    }
    Ok(stacks)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn exported_job_files_are_private_to_their_owner() {
        let root = tempfile::tempdir().unwrap();
        let stack = StackName::new("app").unwrap();
        let mut job = JobSpec::new(
            stack.clone(),
            schema::JobName::new("web").unwrap(),
            "busybox",
        );
        job.env.insert("PASSWORD".into(), "secret".into());
        // A stack folder and job file left world-readable by an earlier export.
        std::fs::create_dir_all(root.path().join("app")).unwrap();
        let old = root.path().join("app/web.yaml");
        std::fs::write(&old, "old").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(
            root.path().join("app"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let written = export(root.path(), &stack, &[job]).unwrap();
        assert_eq!(written, std::slice::from_ref(&old));
        assert_eq!(mode(&old), 0o600);
        assert_eq!(mode(&root.path().join("app")), 0o700);
        assert!(std::fs::read_to_string(&old).unwrap().contains("secret"));
    }

    #[test]
    fn a_file_too_big_for_a_stack_is_refused_before_it_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stack.yml");
        let big = "a:\n  image: x\n".to_owned() + &"#".repeat(MAX_FILE_BYTES as usize);
        std::fs::write(&file, big).unwrap();
        let e = read_stack(dir.path(), "app").unwrap_err();
        assert!(matches!(e, HqError::Input(_)), "bad input, exit 2: {e:?}");
        assert!(e.to_string().contains("a stack file is at most"), "{e}");
    }
}
