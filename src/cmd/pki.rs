//! `vkmigrate pki init` and `pki issue`: the fleet CA and host certificates (the work is in
//! `vkm_transport::pki`).

use anyhow::{Context, Result};
use vkm_transport::pki::{self, HostSpec};

use crate::cli::{PkiArgs, PkiCommand, PkiInitArgs, PkiIssueArgs};

pub fn pki(args: PkiArgs) -> Result<()> {
    match args.command {
        PkiCommand::Init(a) => init(a),
        PkiCommand::Issue(a) => issue(a),
    }
}

fn init(a: PkiInitArgs) -> Result<()> {
    let files = pki::init_ca(&a.ca_dir, &a.common_name, a.days)
        .with_context(|| format!("Cannot create a fleet CA in {}", a.ca_dir.display()))?;
    println!("CA certificate {}", files.cert.display());
    println!(
        "CA key         {} (keep it off the hosts)",
        files.key.display()
    );
    Ok(())
}

fn issue(a: PkiIssueArgs) -> Result<()> {
    let spec = HostSpec {
        name: a.name.clone(),
        ips: a.ips,
        dns: a.dns,
        days: a.days,
    };
    let files = pki::issue(&a.ca_dir, &spec, &a.out, a.force)
        .with_context(|| format!("Cannot issue a certificate for {}", a.name))?;
    println!(
        "certificate {} for {}",
        files.cert.display(),
        files.names.join(", ")
    );
    println!("key         {}", files.key.display());
    println!("CA          {}", files.ca.display());
    println!("use: --tls-dir {}", a.out.display());
    Ok(())
}
