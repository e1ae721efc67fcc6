//! The OpenAPI document served at `/openapi.json`.

use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tether",
        description = "Runs commands and always knows which of them are alive."
    ),
    paths(
        crate::routes::runs::create_run,
        crate::routes::runs::get_run,
        crate::routes::runs::list_runs,
        crate::routes::runs::cancel_run,
        crate::routes::lanes::list_lanes,
        crate::routes::runs::run_logs,
        crate::routes::output::run_output,
        crate::events::run_events,
        crate::routes::workers::register_worker,
        crate::routes::workers::deregister_worker,
        crate::routes::workers::list_workers,
        crate::routes::workers::claim,
        crate::routes::workers::heartbeat,
        crate::routes::attempts::start,
        crate::routes::attempts::append_logs,
        crate::routes::attempts::finish,
        crate::routes::endpoints::put_endpoint,
        crate::routes::endpoints::delete_endpoint,
        crate::routes::endpoints::list_endpoints,
        crate::routes::endpoints::put_pool,
        crate::routes::endpoints::list_pools,
        crate::routes::endpoints::dispatch,
    ),
    components(schemas(
        tether_api::RunView,
        tether_api::RunList,
        tether_api::AttemptView,
        tether_api::ErrorBody,
        tether_api::ErrorDetail,
        tether_api::SubmitRequest,
        tether_api::EventView,
        tether_api::OutputPage,
        tether_api::RegisterWorkerRequest,
        tether_api::RegisterWorkerResponse,
        tether_api::ClaimRequest,
        tether_api::ClaimResponse,
        tether_api::Assignment,
        tether_api::HeartbeatRequest,
        tether_api::HeartbeatResponse,
        tether_api::StartRequest,
        tether_api::AppendLogRequest,
        tether_api::AppendLogResponse,
        tether_api::FinishRequest,
        tether_api::WorkerList,
        tether_api::WorkerView,
        tether_api::LaneView,
        tether_api::LaneList,
        tether_api::PutEndpointRequest,
        tether_api::EndpointView,
        tether_api::EndpointList,
        tether_api::PutPoolRequest,
        tether_api::PoolView,
        tether_api::PoolList,
        tether_api::DispatchView,
    ))
)]
struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
