//! The gRPC contract of the service set, generated from the `.proto` files beside this crate.
//!
//! Each package is versioned (`auth.v1`, ...); a breaking change gets a new version, never an
//! edit in place.

/// `auth.v1`: accounts, login, tokens, sessions and roles.
pub mod auth {
    pub mod v1 {
        #![allow(missing_debug_implementations, unreachable_pub, clippy::all)]
        tonic::include_proto!("auth.v1");
    }
}

/// `profile.v1`: profiles, subscriptions, plans and catalogs.
pub mod profile {
    pub mod v1 {
        #![allow(missing_debug_implementations, unreachable_pub, clippy::all)]
        tonic::include_proto!("profile.v1");
    }
}

/// `notes.v1`: notes, chapters, topics, generation jobs and notifications.
pub mod notes {
    pub mod v1 {
        #![allow(missing_debug_implementations, unreachable_pub, clippy::all)]
        tonic::include_proto!("notes.v1");
    }

    /// The largest `notes.v1` message either side sends or accepts (tonic's default is
    /// 4 MiB): a note at its content limit (8 MiB of text with its chapters and topics) or a
    /// full batch fits, with room for the encoding.
    pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
}

/// The encoded `FileDescriptorSet` of every package above, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));
