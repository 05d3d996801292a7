//! Builders for the configs a kubelet sends: PodSandboxConfig and
//! ContainerConfig, with only the fields our scenarios set.

use std::collections::HashMap;

use k8s_cri::v1 as cri;

/// Linux resources of a container, or of a pod (pod-level resources).
/// Unset values stay 0, which the CRI reads as "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_limit_bytes: i64,
    pub cpu_quota: i64,
    pub cpu_period: i64,
    pub cpu_shares: i64,
}

impl Resources {
    pub fn to_cri(self) -> cri::LinuxContainerResources {
        cri::LinuxContainerResources {
            memory_limit_in_bytes: self.memory_limit_bytes,
            cpu_quota: self.cpu_quota,
            cpu_period: self.cpu_period,
            cpu_shares: self.cpu_shares,
            ..Default::default()
        }
    }
}

/// A PodSandboxConfig as the kubelet fills it for a pod.
#[derive(Debug, Clone)]
pub struct PodBuilder {
    name: String,
    uid: String,
    namespace: String,
    attempt: u32,
    hostname: String,
    log_directory: String,
    cgroup_parent: String,
    resources: Option<Resources>,
    overhead: Option<Resources>,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    privileged: bool,
    host_network: bool,
    dns: Option<cri::DnsConfig>,
    port_mappings: Vec<cri::PortMapping>,
    sysctls: HashMap<String, String>,
}

impl PodBuilder {
    /// A pod `name` in namespace "default", uid `name`-uid, hostname `name`.
    /// [`Kubelet::pod`](super::Kubelet::pod) also sets a unique uid, the
    /// cgroup parent and the log directory.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            uid: format!("{name}-uid"),
            namespace: "default".to_owned(),
            attempt: 0,
            hostname: name.to_owned(),
            log_directory: String::new(),
            cgroup_parent: String::new(),
            resources: None,
            overhead: None,
            labels: HashMap::new(),
            annotations: HashMap::new(),
            privileged: false,
            host_network: false,
            dns: None,
            port_mappings: Vec::new(),
            sysctls: HashMap::new(),
        }
    }

    /// A sysctl of the pod (`securityContext.sysctls`), which the kubelet
    /// passes in `LinuxPodSandboxConfig.sysctls`.
    pub fn sysctl(mut self, name: &str, value: &str) -> Self {
        self.sysctls.insert(name.to_owned(), value.to_owned());
        self
    }

    /// A `hostPort`: TCP `host_port` on the node forwards to
    /// `container_port` in the pod.
    pub fn host_port(mut self, host_port: i32, container_port: i32) -> Self {
        self.port_mappings.push(cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port,
            host_port,
            host_ip: String::new(),
        });
        self
    }

    /// `hostNetwork: true`: the pod shares the node's network namespace.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// The pod's DNS configuration (what the kubelet derives from
    /// `dnsPolicy` and `dnsConfig`).
    pub fn dns(mut self, servers: &[&str], searches: &[&str], options: &[&str]) -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        self.dns = Some(cri::DnsConfig {
            servers: strings(servers),
            searches: strings(searches),
            options: strings(options),
        });
        self
    }

    /// A pod that may hold privileged containers (the CRI refuses them in
    /// a sandbox that is not).
    pub fn privileged(mut self) -> Self {
        self.privileged = true;
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        uid.clone_into(&mut self.uid);
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    pub fn hostname(mut self, hostname: &str) -> Self {
        hostname.clone_into(&mut self.hostname);
        self
    }

    pub fn log_directory(mut self, dir: &str) -> Self {
        dir.clone_into(&mut self.log_directory);
        self
    }

    /// The pod's cgroup (cgroupfs driver: a path such as
    /// `/clh-test-x/pod<uid>`); containers' cgroups are made below it.
    pub fn cgroup_parent(mut self, parent: &str) -> Self {
        parent.clone_into(&mut self.cgroup_parent);
        self
    }

    /// Pod-level resources (`LinuxPodSandboxConfig.resources`, the sum of
    /// the containers' limits plus overhead as the kubelet computes it).
    /// containerd 2.x turns them into the sandbox spec's annotations
    /// `io.kubernetes.cri.sandbox-cpu-period`, `-cpu-quota`, `-cpu-shares`
    /// and `-memory` (podsandbox/sandbox_run_linux.go), which a VM runtime
    /// sizes the VM from. Overhead alone produces no annotation.
    pub fn resources(mut self, r: Resources) -> Self {
        self.resources = Some(r);
        self
    }

    /// The RuntimeClass overhead (`LinuxPodSandboxConfig.overhead`).
    pub fn overhead(mut self, r: Resources) -> Self {
        self.overhead = Some(r);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn build(&self) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: self.attempt,
            }),
            hostname: self.hostname.clone(),
            log_directory: self.log_directory.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
            dns_config: self.dns.clone(),
            port_mappings: self.port_mappings.clone(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                resources: self.resources.map(Resources::to_cri),
                overhead: self.overhead.map(Resources::to_cri),
                sysctls: self.sysctls.clone(),
                security_context: (self.privileged || self.host_network).then(|| {
                    cri::LinuxSandboxSecurityContext {
                        privileged: self.privileged,
                        namespace_options: self.host_network.then(|| cri::NamespaceOption {
                            network: cri::NamespaceMode::Node as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }
                }),
            }),
            ..Default::default()
        }
    }
}

/// A ContainerConfig: image, command and args, resources, log path.
#[derive(Debug, Clone)]
pub struct ContainerBuilder {
    name: String,
    image: String,
    command: Vec<String>,
    args: Vec<String>,
    resources: Option<Resources>,
    attempt: u32,
    mounts: Vec<cri::Mount>,
    privileged: bool,
    seccomp: Option<cri::SecurityProfile>,
    working_dir: String,
}

/// A seccomp profile as the kubelet sends it (`securityContext.seccompProfile`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seccomp {
    /// `RuntimeDefault`: containerd's default profile.
    RuntimeDefault,
    /// `Localhost`: a profile file on the node, by its absolute path (the
    /// kubelet resolves `localhostProfile` below its seccomp directory).
    Localhost(String),
}

impl Seccomp {
    fn to_cri(&self) -> cri::SecurityProfile {
        use cri::security_profile::ProfileType;
        match self {
            Seccomp::RuntimeDefault => cri::SecurityProfile {
                profile_type: ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            },
            Seccomp::Localhost(path) => cri::SecurityProfile {
                profile_type: ProfileType::Localhost as i32,
                localhost_ref: path.clone(),
            },
        }
    }
}

impl ContainerBuilder {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            command: Vec::new(),
            args: Vec::new(),
            resources: None,
            attempt: 0,
            mounts: Vec::new(),
            privileged: false,
            seccomp: None,
            working_dir: String::new(),
        }
    }

    /// A busybox container that sleeps until it is stopped.
    pub fn sleeper(name: &str) -> Self {
        Self::new(name, super::BUSYBOX).command(&["sleep", "100000"])
    }

    /// `securityContext.privileged` (its pod must be privileged too).
    pub fn privileged(mut self) -> Self {
        self.privileged = true;
        self
    }

    /// `workingDir`: the process's cwd (none: the image's).
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = dir.to_owned();
        self
    }

    /// The container's seccomp profile (none: unconfined, CRI's default).
    pub fn seccomp(mut self, profile: Seccomp) -> Self {
        self.seccomp = Some(profile.to_cri());
        self
    }

    /// A volume: `host_path` (as the kubelet resolved it, subPath included)
    /// at `container_path`.
    pub fn mount(mut self, host_path: &str, container_path: &str, readonly: bool) -> Self {
        self.mounts.push(cri::Mount {
            host_path: host_path.to_owned(),
            container_path: container_path.to_owned(),
            readonly,
            ..Default::default()
        });
        self
    }

    /// A volume with its propagation and `recursiveReadOnly` (which the
    /// kubelet sends only with `readonly`, and only to a handler that
    /// reports the feature).
    pub fn mount_with(
        mut self,
        host_path: &str,
        container_path: &str,
        readonly: bool,
        recursive_read_only: bool,
        propagation: cri::MountPropagation,
    ) -> Self {
        self.mounts.push(cri::Mount {
            host_path: host_path.to_owned(),
            container_path: container_path.to_owned(),
            readonly,
            recursive_read_only,
            propagation: propagation as i32,
            ..Default::default()
        });
        self
    }

    /// The entrypoint (replaces the image's).
    pub fn command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The arguments (replace the image's cmd).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `sh -c <script>`.
    pub fn shell(self, script: &str) -> Self {
        self.command(&["sh", "-c", script])
    }

    pub fn memory_limit(mut self, bytes: i64) -> Self {
        self.resources
            .get_or_insert_with(Resources::default)
            .memory_limit_bytes = bytes;
        self
    }

    /// CFS quota and period, in microseconds.
    pub fn cpu(mut self, quota: i64, period: i64) -> Self {
        let r = self.resources.get_or_insert_with(Resources::default);
        r.cpu_quota = quota;
        r.cpu_period = period;
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The config; the log path is relative to the pod's log directory, as
    /// the kubelet sets it (`<name>/<attempt>.log`).
    pub fn build(&self) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: self.name.clone(),
                attempt: self.attempt,
            }),
            image: Some(super::image_spec(&self.image)),
            command: self.command.clone(),
            args: self.args.clone(),
            working_dir: self.working_dir.clone(),
            log_path: format!("{}/{}.log", self.name, self.attempt),
            mounts: self.mounts.clone(),
            linux: Some(cri::LinuxContainerConfig {
                resources: self.resources.map(Resources::to_cri),
                security_context: (self.privileged || self.seccomp.is_some()).then(|| {
                    cri::LinuxContainerSecurityContext {
                        privileged: self.privileged,
                        seccomp: self.seccomp.clone(),
                        ..Default::default()
                    }
                }),
            }),
            ..Default::default()
        }
    }
}
