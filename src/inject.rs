//! Build-time injection of rel=pm links (being written).
