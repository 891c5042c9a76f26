//! `broker passwd FILE USER`: add, change or delete a user of a password
//! file in Mosquitto's format. The password is prompted for twice on the
//! terminal, or read from the first line of standard input
//! (`--password-stdin`, for scripts).

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context};
use broker_auth::password::{check_user, PasswordFile, Scheme};

/// Run the subcommand.
pub fn run(
    file: &Path,
    user: &str,
    delete: bool,
    password_stdin: bool,
    scheme: Scheme,
) -> anyhow::Result<()> {
    if !delete {
        // Before the prompt: a name that cannot be stored is refused now.
        check_user(user)?;
    }
    let mut passwords = if file.exists() {
        PasswordFile::load(file).with_context(|| format!("cannot read {}", file.display()))?
    } else if delete {
        bail!("{} does not exist", file.display());
    } else {
        PasswordFile::default()
    };
    if delete {
        if !passwords.remove(user) {
            bail!("no user {user:?} in {}", file.display());
        }
    } else {
        let password = if password_stdin {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the password from standard input")?;
            line.trim_end_matches(['\n', '\r']).to_string()
        } else {
            let first =
                rpassword::prompt_password("Password: ").context("cannot read the password")?;
            let again = rpassword::prompt_password("Reenter password: ")
                .context("cannot read the password")?;
            if first != again {
                bail!("the passwords do not match");
            }
            first
        };
        if password.is_empty() {
            bail!("empty password");
        }
        passwords.set(user, password.as_bytes(), scheme)?;
    }
    passwords
        .save(file)
        .with_context(|| format!("cannot write {}", file.display()))
}
