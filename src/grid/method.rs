//! The GRID method table: which gRPC paths the sidecar knows and how each is handled.

/// A GRID method the sidecar intercepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GridMethod {
    CreateSession,
    DestroySession,
    ExecuteTool,
    ExecuteToolStream,
    Connect,
}

impl GridMethod {
    pub const ALL: [GridMethod; 5] = [
        GridMethod::CreateSession,
        GridMethod::DestroySession,
        GridMethod::ExecuteTool,
        GridMethod::ExecuteToolStream,
        GridMethod::Connect,
    ];

    pub fn path(self) -> &'static str {
        match self {
            GridMethod::CreateSession => "/altar.grid.v1.GridHost/CreateSession",
            GridMethod::DestroySession => "/altar.grid.v1.GridHost/DestroySession",
            GridMethod::ExecuteTool => "/altar.grid.v1.GridHost/ExecuteTool",
            GridMethod::ExecuteToolStream => "/altar.grid.v1.GridHost/ExecuteToolStream",
            GridMethod::Connect => "/altar.grid.v1.GridRuntime/Connect",
        }
    }

    pub fn from_path(path: &str) -> Option<GridMethod> {
        GridMethod::ALL.into_iter().find(|m| m.path() == path)
    }

    /// Field number of the `Error` in this method's response message.
    /// `Connect` carries errors inside its envelope and is handled per message kind.
    pub fn response_error_field(self) -> u32 {
        match self {
            GridMethod::CreateSession => 3,     // CreateSessionAck.error
            GridMethod::DestroySession => 2,    // DestroySessionAck.error
            GridMethod::ExecuteTool => 4,       // ToolResult.error_details
            GridMethod::ExecuteToolStream => 5, // StreamChunk.error_details
            GridMethod::Connect => 0,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How the data plane treats a request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Grid(GridMethod),
    /// Listed in `passthrough`: forwarded without inspection.
    Passthrough,
    /// Everything else: refused with `METHOD_NOT_ALLOWED`.
    Unknown,
    /// A call on the management port, whose services this release does not serve yet:
    /// refused with `METHOD_NOT_ALLOWED`.
    Management,
}

pub fn route(path: &str, passthrough: &std::collections::HashSet<String>) -> Route {
    if let Some(m) = GridMethod::from_path(path) {
        Route::Grid(m)
    } else if passthrough.contains(path) {
        Route::Passthrough
    } else {
        Route::Unknown
    }
}
