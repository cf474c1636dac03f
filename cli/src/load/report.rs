//! Where `load publish` and `load consume` write their JSON lines: a file or stdout,
//! each line written out at once (a pod's log, read while the run goes on).

use std::io::Write;

use crate::CliError;

pub struct Report {
    out: Box<dyn Write + Send>,
}

impl Report {
    /// `-` is stdout; anything else a file, created or truncated.
    pub fn open(path: &str) -> Result<Self, CliError> {
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            let f = std::fs::File::create(path)
                .map_err(|e| CliError::Usage(format!("--report: cannot create {path}: {e}")))?;
            Box::new(std::io::LineWriter::new(f))
        };
        Ok(Report { out })
    }

    pub fn line(&mut self, v: serde_json::Value) -> Result<(), CliError> {
        writeln!(self.out, "{v}")
            .and_then(|()| self.out.flush())
            .map_err(|e| CliError::Failed(format!("writing the report: {e}")))
    }
}
