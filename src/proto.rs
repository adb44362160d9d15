//! Generated protobuf types and gRPC stubs, in modules that mirror the proto packages
//! (the generated code refers across packages with `super::`).

#![allow(clippy::all, missing_docs)]

pub mod altar {
    pub mod adm {
        pub mod v1 {
            tonic::include_proto!("altar.adm.v1");
        }
    }
    pub mod grid {
        pub mod v1 {
            tonic::include_proto!("altar.grid.v1");
        }
    }
    pub mod aesp {
        pub mod v1 {
            tonic::include_proto!("altar.aesp.v1");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use altar::adm::v1 as adm;
pub use altar::aesp::v1 as aesp;
pub use altar::grid::v1 as grid;
pub use google::rpc;
