//! Streaming Exec and Attach as a kubelet's API server proxy uses them:
//! the CRI call returns a URL on containerd's streaming server, spoken to
//! with the Kubernetes remote-command WebSocket protocol
//! (`v4.channel.k8s.io`, or v5 where the server has it: every message starts
//! with its channel byte, 0 stdin, 1 stdout, 2 stderr, 3 the final status
//! as JSON; v5 adds 255, closing one channel).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1 as cri;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::Cri;

/// What we offer, best first: containerd's streaming server picks one.
const PROTOCOLS: &str = "v5.channel.k8s.io, v4.channel.k8s.io";

/// What a streamed session produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Streamed {
    pub stdout: String,
    pub stderr: String,
    /// The status message of channel 3 (JSON: `Success`, or `Failure` with
    /// the exit code in its details).
    pub status: String,
}

impl Cri {
    /// CRI Exec: the streaming URL for `cmd` in container `id`.
    pub fn exec_url(&self, id: &str, cmd: &[&str], stdin: bool) -> Result<String> {
        let msg = cri::ExecRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            stdin,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let what = format!("Exec({id}, {cmd:?})");
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.exec(Self::req(msg, t)).await
        })?;
        Ok(resp.url)
    }

    /// CRI Attach: the streaming URL for container `id`'s output.
    pub fn attach_url(&self, id: &str) -> Result<String> {
        let msg = cri::AttachRequest {
            container_id: id.to_owned(),
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let what = format!("Attach({id})");
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.attach(Self::req(msg, t)).await
        })?;
        Ok(resp.url)
    }

    /// Connects to a streaming `url`, sends `stdin` (closing it only with
    /// v5: a command reading stdin must stop by itself otherwise), and
    /// collects output until the server closes the session or `until` is
    /// seen in stdout (for an attach, which never ends by itself), all
    /// within `within`.
    pub fn stream(
        &self,
        url: &str,
        stdin: Option<&[u8]>,
        until: Option<&str>,
        within: Duration,
    ) -> Result<Streamed> {
        let session = session(url, stdin, until);
        match self
            .rt
            .block_on(async move { tokio::time::timeout(within, session).await })
        {
            Ok(result) => result,
            Err(_) => bail!("streaming session {url} did not end within {within:?}"),
        }
    }
}

impl Cri {
    /// CRI PortForward: the streaming URL for `port` of pod `pod_id`.
    pub fn port_forward_url(&self, pod_id: &str, port: i32) -> Result<String> {
        let msg = cri::PortForwardRequest {
            pod_sandbox_id: pod_id.to_owned(),
            port: vec![port],
        };
        let what = format!("PortForward({pod_id}, {port})");
        let resp = self.call(&what, self.timeout, |mut rs, _, t| async move {
            rs.port_forward(Self::req(msg, t)).await
        })?;
        Ok(resp.url)
    }

    /// Sends `request` through a port-forward session on `url` (one port)
    /// and returns what came back once it holds `until` (then closes the
    /// session, as a client that got its answer does) or the server ended
    /// it; or the error the server reported; all within `within`.
    pub fn forward(
        &self,
        url: &str,
        port: i32,
        request: &[u8],
        until: &str,
        within: Duration,
    ) -> Result<String> {
        let session = forward_session(url, port, request, until);
        match self
            .rt
            .block_on(async move { tokio::time::timeout(within, session).await })
        {
            Ok(result) => result,
            Err(_) => bail!("port-forward session {url} did not end within {within:?}"),
        }
    }
}

/// The kubelet's WebSocket port-forward protocol: per port a data channel
/// (0) and an error channel (1); every message starts with its channel
/// byte; the server first sends the port (2 bytes, little-endian) on each.
async fn forward_session(url: &str, port: i32, request: &[u8], until: &str) -> Result<String> {
    let ws_url = format!("{}?port={port}", url.replacen("http://", "ws://", 1));
    let mut req = ws_url
        .into_client_request()
        .with_context(|| format!("streaming URL {url}"))?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    ws.send(Message::binary([&[0u8][..], request].concat()))
        .await?;
    let (mut data, mut error) = (Vec::new(), Vec::new());
    let mut headers_seen = [false; 2];
    while let Some(msg) = ws.next().await {
        let msg = match msg {
            Ok(Message::Binary(b)) => b.to_vec(),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let Some((&channel, body)) = msg.split_first() else {
            continue;
        };
        // The first message of each channel is its port.
        if let Some(seen) = headers_seen.get_mut(usize::from(channel)) {
            if !*seen {
                *seen = true;
                continue;
            }
        }
        match channel {
            0 => data.extend_from_slice(body),
            1 => error.extend_from_slice(body),
            _ => {}
        }
        if String::from_utf8_lossy(&data).contains(until) {
            let _ = ws.close(None).await;
            break;
        }
    }
    if !error.is_empty() {
        bail!(
            "port forward to {port}: {}",
            String::from_utf8_lossy(&error)
        );
    }
    Ok(String::from_utf8_lossy(&data).into_owned())
}

async fn session(url: &str, stdin: Option<&[u8]>, until: Option<&str>) -> Result<Streamed> {
    // The streaming server speaks plain HTTP; WebSocket clients want ws://.
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut request = ws_url
        .into_client_request()
        .with_context(|| format!("streaming URL {url}"))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", PROTOCOLS.parse()?);
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let v5 = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .is_some_and(|p| p == "v5.channel.k8s.io");
    if let Some(data) = stdin {
        ws.send(Message::binary([&[0u8][..], data].concat()))
            .await?;
        if v5 {
            // v5 can close stdin alone (channel 255, then the channel).
            ws.send(Message::binary(vec![255u8, 0])).await?;
        }
    }
    let mut out = Streamed::default();
    while let Some(msg) = ws.next().await {
        let data = match msg.context("reading the stream")? {
            Message::Binary(b) => b.to_vec(),
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&channel, body)) = data.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(body);
        match channel {
            1 => out.stdout.push_str(&text),
            2 => out.stderr.push_str(&text),
            3 => out.status.push_str(&text),
            _ => {}
        }
        if until.is_some_and(|u| out.stdout.contains(u)) {
            let _ = ws.close(None).await;
            break;
        }
    }
    Ok(out)
}
