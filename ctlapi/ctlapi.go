// Package ctlapi is the protocol between overlayctl and the overlayd of
// its host: JSON over HTTP on overlayd's Unix socket (the CNI plugin's,
// which only root can open), below /v1/host/. It reports the host's
// status, runs the doctor's checks of the host's kernel state against
// etcd and gossip, and releases a leaked address.
package ctlapi

import (
	"net/netip"
	"time"

	"github.com/overlaynet/overlay/overlay"
)

// Paths of the protocol's operations.
const (
	StatusPath  = "/v1/host/status"
	DoctorPath  = "/v1/host/doctor"
	ReleasePath = "/v1/host/release"
)

// Status is what overlayd reports of its host.
type Status struct {
	// Host is the host's ID.
	Host overlay.HostID `json:"host"`
	// Version is overlayd's version line.
	Version string `json:"version"`
	// Started is when overlayd started.
	Started time.Time `json:"started"`
	// Underlay is the host's underlay address.
	Underlay netip.Addr `json:"underlay"`
	// VTEPMAC is the MAC address of the host's VXLAN devices.
	VTEPMAC string `json:"vtepMAC"`
	// Etcd is how overlayd reaches etcd.
	Etcd EtcdStatus `json:"etcd"`
	// Liveness is whether the host's liveness key exists, as far as
	// overlayd knows.
	Liveness bool `json:"liveness"`
	// Gossip is the host's gossip membership.
	Gossip GossipStatus `json:"gossip"`
	// Networks are the networks overlayd serves, sorted by name.
	Networks []NetworkStatus `json:"networks"`
	// Peers are the other hosts registered in etcd, sorted by ID.
	Peers []PeerStatus `json:"peers"`
}

// EtcdStatus is how overlayd reaches etcd.
type EtcdStatus struct {
	// Embedded is whether overlayd runs the etcd it uses.
	Embedded bool `json:"embedded"`
	// Endpoints are the client URLs overlayd uses.
	Endpoints []string `json:"endpoints"`
	// Error is why etcd did not answer a quorum read just now; "" when
	// it did.
	Error string `json:"error,omitempty"`
}

// GossipStatus is the host's gossip membership.
type GossipStatus struct {
	// Addr is the host:port gossip listens on.
	Addr string `json:"addr"`
	// Members is how many hosts gossip sees alive, this one included.
	Members int `json:"members"`
	// Encrypted is whether gossip is encrypted with a key.
	Encrypted bool `json:"encrypted"`
}

// NetworkStatus is one network on the host.
type NetworkStatus struct {
	// Name, VNI and CIDR identify the network.
	Name string       `json:"name"`
	VNI  uint32       `json:"vni"`
	CIDR netip.Prefix `json:"cidr"`
	// Ready is whether the network serves ADD; Degraded whether its
	// containers may have lost connectivity; Reason says why not.
	Ready    bool   `json:"ready"`
	Degraded bool   `json:"degraded"`
	Reason   string `json:"reason,omitempty"`
	// Blocks are the host's blocks of the network.
	Blocks []netip.Prefix `json:"blocks"`
	// Addresses and Free count the host's addresses in use and free in
	// its blocks.
	Addresses int `json:"addresses"`
	Free      int `json:"free"`
	// PeersProgrammed is how many other hosts the dataplane routes to.
	PeersProgrammed int `json:"peersProgrammed"`
	// Entries counts the dataplane's entries by kind (fdb, neighbour,
	// route, gateway).
	Entries map[string]int `json:"entries"`
	// LastPass and LastSuccess are when the reconcile loop last ended a
	// pass and last ended one without error; PassFailures counts the
	// failed passes since overlayd started.
	LastPass     time.Time `json:"lastPass"`
	LastSuccess  time.Time `json:"lastSuccess"`
	PassFailures uint64    `json:"passFailures"`
	// Mesh counts the network's peers by the health mesh's state
	// (reachable, mtu, unreachable, unknown; those not probed yet are
	// left out); nil when the mesh is off.
	Mesh map[string]int `json:"mesh,omitempty"`
}

// PeerStatus is another host as this one sees it.
type PeerStatus struct {
	// Host is the peer's ID.
	Host overlay.HostID `json:"host"`
	// Underlay is the peer's underlay address, from its host record.
	Underlay netip.Addr `json:"underlay"`
	// Gossip is what gossip says of the peer: "alive", "suspect" (this
	// host's probes got no ack, and memberlist has not declared it
	// failed yet), "dead" (it left or stopped answering) or "unknown"
	// (never seen since overlayd started).
	Gossip string `json:"gossip"`
}

// Report is what the doctor found on one host: every difference between
// the host's kernel and what etcd and gossip say it should hold, each
// with its fix. A report with no findings is a healthy host.
type Report struct {
	// Host is the host checked.
	Host overlay.HostID `json:"host"`
	// Checked is when the checks ran.
	Checked time.Time `json:"checked"`
	// Interval is how often the host's overlayd runs the doctor on its
	// own, in the reports it stores in etcd; it rewrites a report whose
	// findings did not change after ReportRefresh intervals. 0 in an answer to a
	// request.
	Interval time.Duration `json:"interval,omitempty"`
	// Findings are what differs, most severe first.
	Findings []Finding `json:"findings"`
}

// ReportRefresh is after how many intervals overlayd writes a report
// whose findings did not change again, so that its Checked time shows
// that its doctor still runs.
const ReportRefresh = 6

// Severities of a finding.
const (
	// Error is a fault that cuts, or will cut, containers' traffic.
	Error = "error"
	// Warning is a fault that does not cut traffic yet, or may be
	// transient.
	Warning = "warning"
)

// Rank orders severities, the most severe first: Error is 0, anything
// else 1.
func Rank(severity string) int {
	if severity == Error {
		return 0
	}
	return 1
}

// Finding is one difference the doctor found.
type Finding struct {
	// Severity is Error or Warning.
	Severity string `json:"severity"`
	// Network is the network concerned; "" for the host as a whole.
	Network string `json:"network,omitempty"`
	// Check names the check that found it: etcd, liveness, forwarding,
	// firewall, gossip, dataplane, reconcile, addresses, mesh (and, in
	// overlayctl's own findings, registration and doctor).
	Check string `json:"check"`
	// Problem says what differs.
	Problem string `json:"problem"`
	// Fix says what to do about it.
	Fix string `json:"fix"`
}

// ReleaseRequest asks overlayd to release an address that a container
// which no longer exists still holds (a DEL that never came).
type ReleaseRequest struct {
	// Network is the address's network.
	Network string `json:"network"`
	// Addr is the address.
	Addr netip.Addr `json:"addr"`
	// Force releases the address even though the container's host
	// veth still exists.
	Force bool `json:"force,omitempty"`
}

// ReleaseResponse says what was released.
type ReleaseResponse struct {
	// Key is the container interface that held the address.
	Key overlay.AttachmentKey `json:"key"`
	// VethDeleted is whether its host veth existed and was deleted.
	VethDeleted bool `json:"vethDeleted"`
}

// ErrorBody is the body of every answer that is not 2xx.
type ErrorBody struct {
	// Error says what failed and what to do.
	Error string `json:"error"`
}
