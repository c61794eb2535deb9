//! Starting a child process (a launched backend, a provider hook), one way for both: the program
//! resolved by one rule, no input unless the caller pipes some, and killed when its handle is
//! dropped. What happens to its output is the caller's choice (and bound).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// The program a command's first element names: `headroom` is this very binary; a relative path
/// with a directory part is taken from the config file's directory (`base_dir`); anything else
/// is looked up on `PATH` as given.
pub fn program(arg0: &str, base_dir: &Path) -> PathBuf {
    if arg0 == "headroom" {
        if let Ok(exe) = std::env::current_exe() {
            return exe;
        }
    }
    let p = Path::new(arg0);
    if p.is_relative() && arg0.contains('/') {
        base_dir.join(p)
    } else {
        p.to_path_buf()
    }
}

/// A command for `program` with `args`: stdin closed, killed on drop.
pub fn command(program: &Path, args: &[String]) -> Command {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null()).kill_on_drop(true);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_is_this_binary_a_path_from_the_config_directory_or_a_name_on_path() {
        let base = Path::new("/etc/headroom");
        assert_eq!(program("headroom", base), std::env::current_exe().unwrap());
        assert_eq!(program("./scale.sh", base), Path::new("/etc/headroom/./scale.sh"));
        assert_eq!(program("bin/scale", base), Path::new("/etc/headroom/bin/scale"));
        assert_eq!(program("/usr/bin/env", base), Path::new("/usr/bin/env"));
        assert_eq!(program("vllm", base), Path::new("vllm"));
    }
}
