//! The flag tables of README's "Operate" section are generated from the
//! binaries' own `--help`, so they cannot drift: this test fails when they
//! differ, and `NATTER_BLESS=1 cargo test -p natter --test cluster operate`
//! rewrites them.

use std::process::Command;

/// (heading, `natter` arguments before `--help`, the separate binary).
const COMMANDS: &[(&str, &[&str], &str)] = &[
    ("natter serve", &["serve"], ""),
    ("natter sessions", &["sessions"], "natter-sessions"),
    ("natter chats", &["chats"], "natter-chats"),
    ("natter messages", &["messages"], "natter-messages"),
    ("natter assistant", &["assistant"], "natter-assistant"),
    ("natter edge", &["edge"], "natter-edge"),
    ("natter health", &["health"], ""),
];

struct Flag {
    name: String,
    env: String,
    default: String,
    about: String,
}

fn flags(args: &[&str]) -> Vec<Flag> {
    let output = Command::new(env!("CARGO_BIN_EXE_natter")).args(args).arg("--help").output().expect("natter --help");
    let help = String::from_utf8(output.stdout).expect("utf-8 help");
    let mut flags: Vec<Flag> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim();
        if let Some(rest) =
            trimmed.strip_prefix("--").filter(|_| line.starts_with("      --") || line.starts_with("  -"))
        {
            let name = rest.split([' ', '=']).next().unwrap_or_default().to_owned();
            let mut flag = Flag { name, env: String::new(), default: String::new(), about: String::new() };
            // Short help puts the text on the flag's line, after two or more
            // spaces: `--addr <ADDR>  What it is [default: x]`.
            if let Some((_, text)) = rest.split_once("  ") {
                let mut text = text.trim();
                while let Some(open) = text.rfind(" [").filter(|_| text.ends_with(']')) {
                    let note = &text[open + 2..text.len() - 1];
                    if let Some(env) = note.strip_prefix("env: ") {
                        flag.env = env.split('=').next().unwrap_or_default().to_owned();
                    } else if let Some(default) = note.strip_prefix("default: ") {
                        flag.default = default.to_owned();
                    }
                    text = text[..open].trim_end();
                }
                flag.about = text.to_owned();
            }
            flags.push(flag);
        } else if let Some(flag) = flags.last_mut() {
            if let Some(env) = trimmed.strip_prefix("[env: ") {
                flag.env = env.split('=').next().unwrap_or_default().to_owned();
            } else if let Some(default) = trimmed.strip_prefix("[default: ") {
                flag.default = default.trim_end_matches(']').to_owned();
            } else if flag.about.is_empty() && !trimmed.is_empty() {
                flag.about = trimmed.to_owned();
            }
        }
    }
    flags.retain(|f| f.name != "help" && f.name != "version");
    flags
}

fn generated() -> String {
    let mut out = String::new();
    for (heading, args, binary) in COMMANDS {
        out.push_str(&format!("#### `{heading}`"));
        if !binary.is_empty() {
            out.push_str(&format!(" (also `{binary}`)"));
        }
        out.push_str("\n\n| flag | environment | default | meaning |\n|---|---|---|---|\n");
        for f in flags(args) {
            let cell = |s: &str| if s.is_empty() { String::new() } else { format!("`{}`", s.replace('|', "\\\\|")) };
            out.push_str(&format!(
                "| `--{}` | {} | {} | {} |\n",
                f.name,
                cell(&f.env),
                cell(&f.default),
                f.about.replace('|', "\\\\|")
            ));
        }
        out.push('\n');
    }
    out
}

#[test]
fn readme_operate_tables_match_the_binaries() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let (start, end) = ("<!-- operate:start -->\n", "<!-- operate:end -->");
    let from = readme.find(start).expect("operate:start marker") + start.len();
    let to = readme.find(end).expect("operate:end marker");
    let want = generated();
    if std::env::var_os("NATTER_BLESS").is_some() {
        std::fs::write(path, format!("{}{want}{}", &readme[..from], &readme[to..])).expect("write README.md");
        return;
    }
    assert!(
        readme[from..to] == want,
        "README's Operate tables differ from --help; run NATTER_BLESS=1 cargo test -p natter --test cluster operate\n{want}"
    );
}

/// In a Kubernetes pod, a split service refuses the deploy files'
/// placeholder credential or database password (anyone who read them holds
/// it) and says which secret to replace. (That it only warns elsewhere is
/// natter-kit's unit test: a process that starts would have to be stopped.)
#[test]
fn a_placeholder_secret_is_refused_in_a_pod() {
    let placeholder = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/dev-secrets/service-credential");
    let dir = tempfile::tempdir().expect("temp dir");
    let credential = dir.path().join("credential");
    std::fs::write(&credential, "q3Vx9mZ2c1bKp0LrT8wYh4nJ6sFgA5dE\n").expect("write credential");
    let placeholder_url = "postgres://natter:REPLACE-ME-natter-database-password@127.0.0.1:1/natter";
    let cases: [(&[&str], &str); 2] = [
        (
            &["--service-credential-file", placeholder],
            "the service credential (--service-credential-file) is the placeholder",
        ),
        (
            &["--service-credential-file", credential.to_str().expect("utf-8 path"), "--database-url", placeholder_url],
            "the database URL (--database-url) is the placeholder",
        ),
    ];
    for (flags, refusal) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_natter"))
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .args(["sessions", "--listen", "127.0.0.1:0", "--internal-listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(flags)
            .output()
            .expect("run natter");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started with a placeholder: {stderr}");
        assert!(stderr.contains(refusal), "{stderr}");
    }
}
