//! The tonic adapter: convert in, call the lifecycle, convert out.
//!
//! The caller narrows every call: a backend reaches only its tenants'
//! requests (others are NOT_FOUND), and a processor's id is qualified by
//! the name on its credential, so one processor's credential can never
//! report on, complete or fail work that another credential holds.

use std::pin::Pin;
use streamer_core::trace;
use tracing::Instrument as _;

use futures::Stream;
use streamer_api::v1;
use streamer_api::v1::progress_service_server::ProgressService;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use streamer_core::trust::Caller;

use crate::ProgressServer;
use crate::model::{
    Cancel, Claim, Complete, Fail, Lookup, Refused, Report, Submit, request_to_proto,
};

/// A processor's id as the lifecycle knows it: `holder/id` for a caller
/// that proved who it is, the id itself where nobody did (trust `none`).
fn qualified(caller: &Caller, processor_id: String) -> String {
    if caller.authenticated {
        format!("{}/{processor_id}", caller.subject)
    } else {
        processor_id
    }
}

/// How many requests a `Report` answer lists the refusals of.
const MAX_LISTED_REJECTIONS: usize = 100;

/// Counts a refused report under its request's entry, listing a new
/// request while there is room (`ReportResponse.rejected` counts them all).
fn note_rejection(rejections: &mut Vec<v1::ReportRejection>, id: &str, refused: Refused) {
    if let Some(entry) = rejections.iter_mut().find(|r| r.id == id) {
        entry.count += 1;
    } else if rejections.len() < MAX_LISTED_REJECTIONS {
        rejections.push(v1::ReportRejection {
            id: id.to_owned(),
            reason: v1::ReportRejectionReason::from(refused).into(),
            count: 1,
        });
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ProgressService for ProgressServer {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!(
                "progress.submit",
                otel.kind = "server",
                connection_id = %request.get_ref().connection_id,
                request_id = %request.get_ref().request_id,
                action = %request.get_ref().action,
            ),
        );
        let cmd: Submit = request.into_inner().try_into()?;
        let (record, duplicate) = self.lifecycle.submit(cmd, &caller).instrument(span).await?;
        Ok(Response::new(v1::SubmitResponse {
            request: Some(request_to_proto(record)),
            duplicate,
        }))
    }

    type ClaimStream = BoxStream<v1::ClaimResponse>;

    async fn claim(
        &self,
        request: Request<v1::ClaimRequest>,
    ) -> Result<Response<Self::ClaimStream>, Status> {
        let caller = Caller::of(&request);
        let mut cmd: Claim = request.into_inner().try_into()?;
        cmd.processor_id = qualified(&caller, cmd.processor_id);
        let (rx, guard) = self.lifecycle.claim(cmd)?;
        // The guard lives as long as the stream: dropping it (the processor
        // went away) gives its work back.
        let stream = UnboundedReceiverStream::new(rx).map(move |item| {
            let _alive = &guard;
            Ok(item)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report(
        &self,
        request: Request<Streaming<v1::ReportRequest>>,
    ) -> Result<Response<v1::ReportResponse>, Status> {
        let caller = Caller::of(&request);
        // One context for the stream: each report is a child of it.
        let parent = trace::from_metadata(request.metadata());
        let mut reports = request.into_inner();
        let mut answer = v1::ReportResponse::default();
        while let Some(report) = reports.message().await? {
            let span =
                tracing::info_span!("progress.report", otel.kind = "server", id = %report.id);
            trace::continue_from(&span, [parent.clone()]);
            let mut report: Report = report.try_into()?;
            report.processor_id = qualified(&caller, report.processor_id);
            let id = report.id.clone();
            match self.lifecycle.report(report).instrument(span).await? {
                None => answer.accepted += 1,
                Some(refused) => {
                    answer.rejected += 1;
                    note_rejection(&mut answer.rejections, id.as_str(), refused);
                }
            }
        }
        Ok(Response::new(answer))
    }

    async fn complete(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!("progress.complete", otel.kind = "server", id = %request.get_ref().id),
        );
        let mut cmd: Complete = request.into_inner().try_into()?;
        cmd.processor_id = qualified(&caller, cmd.processor_id);
        let record = self.lifecycle.complete(cmd).instrument(span).await?;
        Ok(Response::new(v1::CompleteResponse {
            request: Some(request_to_proto(record)),
        }))
    }

    async fn fail(
        &self,
        request: Request<v1::FailRequest>,
    ) -> Result<Response<v1::FailResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!("progress.fail", otel.kind = "server", id = %request.get_ref().id),
        );
        let mut cmd: Fail = request.into_inner().try_into()?;
        cmd.processor_id = qualified(&caller, cmd.processor_id);
        let record = self.lifecycle.fail(cmd).instrument(span).await?;
        Ok(Response::new(v1::FailResponse {
            request: Some(request_to_proto(record)),
        }))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        let caller = Caller::of(&request);
        let span = trace::server_span(
            &request,
            tracing::info_span!("progress.cancel", otel.kind = "server", id = %request.get_ref().id),
        );
        let cmd: Cancel = request.into_inner().try_into()?;
        let record = self.lifecycle.cancel(cmd, &caller).instrument(span).await?;
        Ok(Response::new(v1::CancelResponse {
            request: Some(request_to_proto(record)),
        }))
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        let caller = Caller::of(&request);
        let lookup: Lookup = request.into_inner().try_into()?;
        let record = self.lifecycle.get(lookup, &caller).await?;
        Ok(Response::new(v1::GetResponse {
            request: Some(request_to_proto(record)),
        }))
    }

    type WatchStream = BoxStream<v1::WatchResponse>;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&request);
        let lookup: Lookup = request.into_inner().try_into()?;
        let rx = self.lifecycle.watch(lookup, &caller).await?;
        let stream = ReceiverStream::new(rx).map(|record| {
            Ok(v1::WatchResponse {
                request: Some(request_to_proto(record)),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
