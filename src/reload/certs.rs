//! The listeners' certificates: applied from a new config, or reloaded when their files change
//! (the old ones stay when the new ones do not load).

use super::signals::{unix_now, watch_files};
use super::Reloader;
use crate::telemetry;

impl Reloader {
    /// Serves `tls`'s certificates to new connections (or records why not: `error`), and watches
    /// its files.
    pub(super) fn apply_tls(&mut self, tls: Option<&crate::config::TlsConfig>, error: Option<String>) {
        let Some(server) = self.control.gateway.tls() else {
            if tls.is_some() {
                tracing::warn!("[server.tls] was added to the config; TLS is turned on at start only");
            }
            return;
        };
        let Some(tls) = tls else {
            tracing::warn!("[server.tls] was removed from the config; TLS stays on until restart");
            return;
        };
        let mut status = self.control.config_status();
        match error {
            None => {
                server.update(tls);
                status.tls_error = None;
                status.tls_loaded_at = Some(unix_now());
                self.cert_watcher = watch_files(&tls.files(), self.cert_events_tx.clone());
            }
            Some(e) => {
                tracing::error!(error = %e, "TLS certificate reload rejected; the certificates in use stay");
                status.tls_error = Some(e);
            }
        }
        self.control.set_config_status(status);
    }

    /// Reads the certificate and key files again after they changed on disk.
    pub(super) fn reload_certs(&mut self) {
        let running = self.control.snapshot();
        let Some(current) = running.config.server.tls.as_ref() else { return };
        match current.reload_files() {
            Ok(fresh) => {
                tracing::info!("TLS certificates reloaded");
                telemetry::tls_cert_reloaded(true);
                self.apply_tls(Some(&fresh), None);
            }
            Err(e) => {
                telemetry::tls_cert_reloaded(false);
                self.apply_tls(Some(current), Some(e));
            }
        }
    }
}
