//! natter-kit's integration tests: its server over real sockets.

mod serve;
