//! The tonic adapter: convert in, call the lifecycle, convert out.

use std::pin::Pin;

use futures::Stream;
use streamer_api::v1;
use streamer_api::v1::progress_service_server::ProgressService;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::ProgressServer;
use crate::error::ProgressError;
use crate::model::{Cancel, Claim, Complete, Fail, Lookup, Report, Submit, request_to_proto};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ProgressService for ProgressServer {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let cmd: Submit = request.into_inner().try_into()?;
        let (record, duplicate) = self.lifecycle.submit(cmd).await?;
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
        let cmd: Claim = request.into_inner().try_into()?;
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
        request: Request<Streaming<v1::ProgressReport>>,
    ) -> Result<Response<v1::ReportSummary>, Status> {
        let mut reports = request.into_inner();
        let mut summary = v1::ReportSummary::default();
        while let Some(report) = reports.message().await? {
            let report: Report = report.try_into()?;
            if self.lifecycle.report(report).await? {
                summary.accepted += 1;
            } else {
                summary.rejected += 1;
            }
        }
        Ok(Response::new(summary))
    }

    async fn complete(
        &self,
        request: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::Request>, Status> {
        let cmd: Complete = request.into_inner().try_into()?;
        let record = self.lifecycle.complete(cmd).await?;
        Ok(Response::new(request_to_proto(record)))
    }

    async fn fail(
        &self,
        request: Request<v1::FailRequest>,
    ) -> Result<Response<v1::Request>, Status> {
        let cmd: Fail = request.into_inner().try_into()?;
        let record = self.lifecycle.fail(cmd).await?;
        Ok(Response::new(request_to_proto(record)))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::Request>, Status> {
        let cmd: Cancel = request.into_inner().try_into()?;
        let record = self.lifecycle.cancel(cmd).await?;
        Ok(Response::new(request_to_proto(record)))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::Request>, Status> {
        let lookup: Lookup = request.into_inner().try_into()?;
        let record = self.lifecycle.get(lookup).await?;
        Ok(Response::new(request_to_proto(record)))
    }

    type WatchStream = BoxStream<v1::RequestUpdate>;

    async fn watch(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let lookup: Lookup = request.into_inner().try_into()?;
        if lookup.deliver_to.is_some() {
            return Err(ProgressError::invalid(
                "deliver_to_connection_id",
                "is only accepted by Get",
            )
            .into());
        }
        let rx = self.lifecycle.watch(lookup).await?;
        let stream = ReceiverStream::new(rx).map(|record| {
            Ok(v1::RequestUpdate {
                request: Some(request_to_proto(record)),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
