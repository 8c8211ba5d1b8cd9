export { ConnectionsClient, text, Text, toPayload } from "./connections";
export type { BroadcastTarget, Data, ListOptions, PublishOptions, SendOptions, SubscriptionTarget } from "./connections";
export { ProgressClient } from "./progress";
export type { Failure, Owner, RequestSelector, SubmitOptions } from "./progress";
export { Router } from "./router";
export type { InboundRequest, RouterHandler, RouterOptions } from "./router";
export { JobAborted, Processor } from "./processor";
export type { Job, JobAbortKind, ProcessorHandler, ProcessorOptions } from "./processor";
export {
  decodeStatusDetails,
  HandlerError,
  RetryableError,
  STATUS_DETAILS_TRAILER,
  StreamerError,
  toStreamerError,
} from "./errors";
export type { ErrorReasonName, FieldViolation, StatusDetails } from "./errors";
export { toJson } from "./json";
export type { Json, JsonObject } from "./json";
export type { CallOptions, ClientOptions } from "./transport";
export { status as GrpcStatus } from "@grpc/grpc-js";
export { DeliveryOutcome } from "./gen/streamer/v1/connection";
export type {
  BroadcastResponse,
  Connection,
  InboundMessage,
  PublishResponse,
  RouterRegistered,
  SubscribeResponse,
  Subscription,
  TopicPosition,
} from "./gen/streamer/v1/connection";
export { ReportRejectionReason, RequestStatus } from "./gen/streamer/v1/progress";
export type { ProcessorRegistered, Progress, Request, RequestError } from "./gen/streamer/v1/progress";
export { ErrorReason } from "./gen/streamer/v1/common";
export type { Identity } from "./gen/streamer/v1/common";
