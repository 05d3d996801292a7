//! The node label that tells the scheduler clh-shim is installed here
//! (RuntimeClass `clh` selects it), set and removed through the Kubernetes
//! API with the installer pod's service account (RBAC: nodes get/patch,
//! packaging/kubernetes/clh-deploy.yaml).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{InstallError, Result};

pub const LABEL: &str = "clh-shim/runtime";
/// Where the kubelet mounts a pod's service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// One API call, connect included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster's API server as a pod reaches it.
pub struct ApiServer {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ApiServer {
    /// From the pod's environment (KUBERNETES_SERVICE_HOST and _PORT) and
    /// its service account in `sa_dir` (token, ca.crt).
    pub fn in_cluster(sa_dir: &Path) -> Result<ApiServer> {
        let env = |k: &str| {
            std::env::var(k).map_err(|_| {
                label_err(format!(
                    "{k} is not set: not in a pod? Label the node yourself (kubectl label node NAME {LABEL}=true)"
                ))
            })
        };
        let host = env("KUBERNETES_SERVICE_HOST")?;
        let port = env("KUBERNETES_SERVICE_PORT")?;
        let read = |name: &str| -> Result<Vec<u8>> {
            let p: PathBuf = sa_dir.join(name);
            std::fs::read(&p).map_err(|e| {
                label_err(format!(
                    "reading {}: {e} (is automountServiceAccountToken off?)",
                    p.display()
                ))
            })
        };
        let token = String::from_utf8_lossy(&read("token")?).trim().to_owned();
        let ca = read("ca.crt")?;
        let certs: Vec<_> = ureq::tls::parse_pem(&ca)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(label_err(format!(
                "no certificate in {}/ca.crt",
                sa_dir.display()
            )));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(CALL_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        // An IPv6 service address needs brackets in a URL.
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(ApiServer {
            base: format!("https://{host}:{port}"),
            token,
            agent,
        })
    }

    /// Sets (`Some`) or removes (`None`) [`LABEL`] on `node`.
    pub fn label_node(&self, node: &str, value: Option<&str>) -> Result<()> {
        let body = serde_json::json!({ "metadata": { "labels": { LABEL: value } } });
        let url = format!("{}/api/v1/nodes/{node}", self.base);
        let mut response = self
            .agent
            .patch(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .content_type("application/merge-patch+json")
            .send(body.to_string())
            .map_err(|e| label_err(format!("PATCH {url}: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let hint = match status.as_u16() {
            401 | 403 => " (check the ClusterRole of clh-deploy.yaml: nodes get/patch)",
            404 => " (NODE_NAME must be the node's name: spec.nodeName through the downward API)",
            _ => "",
        };
        Err(label_err(format!(
            "PATCH {url}: {status}{hint}: {}",
            text.trim()
        )))
    }
}

fn label_err(detail: String) -> InstallError {
    InstallError::Label(detail)
}
