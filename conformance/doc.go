// Package conformance checks a CNI plugin against the rules of the CNI
// 1.1 spec and its conventions, one subtest per rule, named for the rule.
// It execs the plugin binary as a runtime would (environment, stdin,
// stdout, exit code) and inspects the container's namespace through
// netlink, so any plugin can be pointed at it: describe it with a Target
// and call Run from a test. It needs root (Linux).
//
// Point it at a network dedicated to the run: the GC rules tell the
// plugin that only the suite's own attachments are valid, so it releases
// every other attachment of that network on the host.
//
// Most rules are the spec's. GC_reads_both_attachment_keys is a libcni
// compatibility rule: libcni sends the valid attachments under both
// cni.dev/valid-attachments (the spec's key) and cni.dev/attachments (the
// key the 1.1.0 tag of the spec named), so a plugin that reads only one
// works with libcni but not with a runtime that sends only the other.
//
// The rules are listed in docs/cni.md with this project's results.
package conformance
