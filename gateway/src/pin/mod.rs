//! Loads the kernel programs, attaches them to the agent cgroups and owns
//! their maps. Implemented in the skeleton commit that follows.
