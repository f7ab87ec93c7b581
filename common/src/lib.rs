#![forbid(unsafe_code)]
//! vkmigrate's pure core: the state model, the image/stream format and /proc parsers.

pub mod error;
pub mod evacuate;
pub mod image;
pub mod live;
pub mod mconsole;
pub mod model;
pub mod net;
pub mod procfs;
