// Package conformance checks a CNI plugin against the rules of the CNI
// 1.1 spec and its conventions, one subtest per rule, named for the rule.
// It execs the plugin binary as a runtime would (environment, stdin,
// stdout, exit code) and inspects the container's namespace through
// netlink, so any plugin can be pointed at it: describe it with a Target
// and call Run from a test. It needs root (Linux).
//
// The rules are listed in docs/cni.md with this project's results.
package conformance
