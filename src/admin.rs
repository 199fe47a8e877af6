//! The operator's admin service (`scanserver.v1.Admin`), on a listener of
//! its own (loopback by default, never the agent port), and how
//! `scanserver status`, `agents`, `tags` and `rules reload` print its
//! answers.

use std::{sync::Arc, time::Duration};

use tonic::{
    Request, Response, Status,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::{
    auth::{BearerToken, SendToken},
    proto::{
        AgentsReply, AgentsRequest, ComponentState, Health, ReloadSignaturesReply,
        ReloadSignaturesRequest, StatusReply, StatusRequest, SvmReason, TagReply, TagRequest,
        VmInfo, VmReason, admin_client, admin_server::Admin,
    },
    reload::Reloader,
    status::{Svm, WhichVms, signatures_info},
    vms::{MAX_LISTING_SIZE, SecurityTag, TagError},
};

/// The default address of the admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7406";

/// The admin service.
pub struct AdminService {
    svm: Arc<Svm>,
    reloader: Arc<Reloader>,
}

impl AdminService {
    pub fn new(svm: Arc<Svm>, reloader: Arc<Reloader>) -> Self {
        AdminService { svm, reloader }
    }

    fn tag_reply(
        &self,
        vm_id: &str,
        changed: Result<bool, TagError>,
    ) -> Result<Response<TagReply>, Status> {
        let changed = changed.map_err(|err| Status::not_found(err.to_string()))?;
        let vm = self.svm.vm(vm_id);
        Ok(Response::new(TagReply { changed, vm }))
    }
}

/// The tag a request names, or INVALID_ARGUMENT.
fn requested_tag(request: &TagRequest) -> Result<SecurityTag, Status> {
    request.tag.parse().map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let report = self.svm.report(WhichVms::None);
        Ok(Response::new(StatusReply {
            report: Some(report),
            components: self.svm.components(),
        }))
    }

    async fn agents(&self, _: Request<AgentsRequest>) -> Result<Response<AgentsReply>, Status> {
        Ok(Response::new(AgentsReply {
            vms: self.svm.vm_infos(WhichVms::All),
        }))
    }

    async fn assign_tag(&self, request: Request<TagRequest>) -> Result<Response<TagReply>, Status> {
        let request = request.into_inner();
        let tag = requested_tag(&request)?;
        let changed = self.svm.vms.assign(&request.vm_id, tag);
        if let Ok(true) = changed {
            tracing::warn!(vm = %request.vm_id, %tag, "security tag assigned by an operator");
        }
        self.tag_reply(&request.vm_id, changed)
    }

    async fn remove_tag(&self, request: Request<TagRequest>) -> Result<Response<TagReply>, Status> {
        let request = request.into_inner();
        let tag = requested_tag(&request)?;
        let changed = self.svm.vms.remove(&request.vm_id, tag);
        if let Ok(true) = changed {
            tracing::info!(vm = %request.vm_id, %tag, "security tag removed by an operator");
            let session = self
                .svm
                .vms
                .get(&request.vm_id)
                .and_then(|vm| vm.session_id)
                .and_then(|id| self.svm.sessions.get(&id));
            if let Some(session) = session {
                session.restart(&format!("the operator removed the security tag {tag}"));
            }
        }
        self.tag_reply(&request.vm_id, changed)
    }

    async fn reload_signatures(
        &self,
        _: Request<ReloadSignaturesRequest>,
    ) -> Result<Response<ReloadSignaturesReply>, Status> {
        let reload = self.reloader.reload().await.map_err(|err| {
            let mut message = err.abridged(RELOAD_ERRORS_SHOWN);
            // It travels in a header: hyper refuses large ones.
            if message.len() > MAX_RELOAD_ERROR {
                message.truncate(message.floor_char_boundary(MAX_RELOAD_ERROR));
                message += "...";
            }
            Status::failed_precondition(format!(
                "{message}\nthe SVM goes on with signatures version {}",
                self.svm.engine.ruleset().version()
            ))
        })?;
        let warnings = if reload.changed {
            reload
                .ruleset
                .warnings()
                .iter()
                .map(|w| w.to_string())
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(ReloadSignaturesReply {
            changed: reload.changed,
            previous_version: reload.previous.to_string(),
            signatures: Some(signatures_info(&reload.ruleset)),
            warnings,
            elapsed_ms: reload.elapsed.as_millis() as u64,
        }))
    }
}

/// Compiler errors a failed reload's answer shows in full.
const RELOAD_ERRORS_SHOWN: usize = 10;

/// The longest error a failed reload's answer carries, in bytes (the
/// rest is cut off): gRPC sends it in an HTTP/2 header, percent-encoded
/// (up to three bytes each), and clients refuse headers over 16 KiB.
const MAX_RELOAD_ERROR: usize = 4 << 10;

/// A client of the admin service, sending the operator's token, if any.
pub type AdminClient = admin_client::AdminClient<InterceptedService<Channel, SendToken>>;

/// What an admin request without the right token is told.
pub const TOKEN_HINT: &str = "pass the server's token file with --admin-token-file FILE (other clients: send the header `authorization: Bearer TOKEN`)";

/// How long an operator command waits for the server's answer: a server
/// that accepts and never answers must not hang a monitoring script.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `scanserver rules reload` waits: compiling a large ruleset
/// takes seconds to minutes, more on a busy SVM.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Connects to the admin service at `addr` (`host:port`, or a URL), to send
/// `token` with every request, and to wait at most `timeout` for each
/// answer.
pub async fn connect(
    addr: &str,
    token: Option<BearerToken>,
    timeout: Duration,
) -> Result<AdminClient, String> {
    let url = match addr.contains("://") {
        true => addr.to_owned(),
        false => format!("http://{addr}"),
    };
    let unreachable = |err: &dyn std::fmt::Display| {
        format!(
            "cannot reach the admin service at {addr}: {err} (is `scanserver serve` running? does --admin match its --admin-listen?)"
        )
    };
    let endpoint = Endpoint::from_shared(url).map_err(|e| unreachable(&crate::WithCauses(&e)))?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| unreachable(&crate::WithCauses(&e)))?;
    let client = admin_client::AdminClient::with_interceptor(channel, SendToken(token));
    Ok(client.max_decoding_message_size(MAX_LISTING_SIZE))
}

/// `scanserver status` as text.
pub fn render_status(reply: &StatusReply) -> String {
    let mut out = String::new();
    let Some(report) = &reply.report else {
        return out;
    };
    let svm = report.svm.clone().unwrap_or_default();
    out += &format!(
        "SVM {} ({}), version {}\n",
        svm.name, svm.svm_id, svm.version
    );
    out += &format!(
        "uptime {}\n",
        humantime::format_duration(Duration::from_secs(svm.uptime_seconds))
    );
    out += &format!("status {}\n", health(report.status));
    for reason in &report.reasons {
        out += &format!("  reason: {}\n", svm_reason(*reason));
    }
    out += "components:\n";
    for component in &reply.components {
        let state = match ComponentState::try_from(component.state) {
            Ok(ComponentState::Ok) => "OK",
            Ok(ComponentState::Warning) => "WARNING",
            Ok(ComponentState::Critical) => "CRITICAL",
            Ok(ComponentState::Disabled) => "disabled",
            _ => "unknown",
        };
        out += &format!(
            "  {:<30} {:<9} {}\n",
            component.name, state, component.detail
        );
        let mut counts: Vec<_> = component.counts.iter().collect();
        counts.sort();
        if !counts.is_empty() {
            let counts: Vec<_> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out += &format!("  {:<30} {:<9} {}\n", "", "", counts.join(", "));
        }
    }
    if let Some(load) = &report.load {
        out += &format!(
            "load: {:.1} scans/s, {:.1} MB/s, queue {}/{}, {} files in flight, CPU {:.0}%, memory {} MiB\n",
            load.scans_per_second,
            load.megabytes_per_second,
            load.queue_depth,
            load.queue_capacity,
            load.scans_in_flight,
            load.cpu_percent,
            load.memory_bytes >> 20
        );
    }
    out
}

/// `scanserver rules reload` as text.
pub fn render_reload(reply: &ReloadSignaturesReply) -> String {
    let signatures = reply.signatures.clone().unwrap_or_default();
    if !reply.changed {
        return format!(
            "signatures unchanged: version {} ({} rules)\n",
            signatures.version, signatures.rule_count
        );
    }
    let mut out = format!(
        "signatures reloaded: version {} ({} rules) replaces {}, in {:.2} s\n",
        signatures.version,
        signatures.rule_count,
        reply.previous_version,
        reply.elapsed_ms as f64 / 1000.0
    );
    if !reply.warnings.is_empty() {
        out += &format!(
            "{} compiler warnings (`scanserver rules check` shows them; --json lists them)\n",
            reply.warnings.len()
        );
    }
    out
}

/// `scanserver agents` as text: one line per VM.
pub fn render_agents(reply: &AgentsReply) -> String {
    let mut out = format!(
        "{:<24} {:<20} {:<10} {:<9} {}\n",
        "VM", "NAME", "CONNECTED", "STATUS", "REASONS / TAGS"
    );
    for vm in &reply.vms {
        out += &render_vm(vm);
    }
    out
}

fn render_vm(vm: &VmInfo) -> String {
    let mut notes: Vec<String> = vm.reasons.iter().map(|r| vm_reason(*r)).collect();
    notes.extend(vm.tags.iter().map(|t| format!("tag {}", t.name)));
    format!(
        "{:<24} {:<20} {:<10} {:<9} {}\n",
        vm.vm_id,
        vm.vm_name,
        if vm.connected { "yes" } else { "no" },
        health(vm.status),
        notes.join(", ")
    )
}

fn health(value: i32) -> &'static str {
    match Health::try_from(value) {
        Ok(Health::Ok) => "OK",
        Ok(Health::Warning) => "WARNING",
        Ok(Health::Critical) => "CRITICAL",
        _ => "UNKNOWN",
    }
}

fn svm_reason(value: i32) -> String {
    SvmReason::try_from(value)
        .map_or_else(|_| format!("reason {value}"), |r| r.describe().to_owned())
}

fn vm_reason(value: i32) -> String {
    VmReason::try_from(value)
        .map_or_else(|_| format!("reason {value}"), |r| r.describe().to_owned())
}
