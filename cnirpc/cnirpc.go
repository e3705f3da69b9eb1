// Package cnirpc is the protocol between the overlay-cni plugin and
// overlayd: JSON over HTTP on a Unix socket that only root can open. The
// version is the first path element (/v1/...); a server answers the
// versions it knows and 404 to others, so a newer plugin can fall back.
//
// Every failure is an Error carrying a CNI error code, so the plugin
// passes it to the runtime unchanged.
package cnirpc

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/overlaynet/overlay/overlay"
)

// Version is the protocol version this package speaks.
const Version = "v1"

// DefaultSocket is where overlayd listens by default.
const DefaultSocket = "/run/overlay/overlayd.sock"

// CNI error codes used by the protocol (CNI spec, "Error").
const (
	CodeIncompatibleVersion = 1
	CodeUnsupportedField    = 2
	CodeUnknownContainer    = 3
	CodeInvalidEnvironment  = 4
	CodeIOFailure           = 5
	CodeDecodingFailure     = 6
	CodeInvalidNetwork      = 7
	CodeTryAgainLater       = 11
	// CodeNoAddress is plugin-specific: the network has no free address
	// on this host.
	CodeNoAddress = 100
	// CodeInternal is a failure that retrying will not fix; the same code
	// as the CNI library's ErrInternal, which the plugin uses for its own
	// failures.
	CodeInternal = 999
)

// Error is a failure with a CNI error code. It is the body of every
// non-2xx answer.
type Error struct {
	// Code is the CNI error code.
	Code uint `json:"code"`
	// Msg says what failed, for a person.
	Msg string `json:"msg"`
	// Details carries the underlying error, if any.
	Details string `json:"details,omitempty"`
}

// Error returns the message and details.
func (e *Error) Error() string {
	if e.Details == "" {
		return e.Msg
	}
	return e.Msg + ": " + e.Details
}

// Errorf returns an *Error with code and a formatted message.
func Errorf(code uint, format string, args ...any) *Error {
	return &Error{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// Request names one container interface on one network.
type Request struct {
	// Network is the overlay network's name (the CNI config's "network"
	// field, or its "name").
	Network string `json:"network"`
	// ContainerID is CNI_CONTAINERID.
	ContainerID string `json:"containerID"`
	// IfName is CNI_IFNAME.
	IfName string `json:"ifName"`
	// IP, when valid, is the address the runtime asked for (the CNI
	// "ips" capability); ADD allocates exactly it or fails.
	IP netip.Addr `json:"ip,omitzero"`
	// MAC, on ADD, is the MAC address the container interface will have,
	// as text: the runtime's (the CNI "mac" capability) or one the plugin
	// picked. Empty (an older plugin, which lets the kernel pick) records
	// none.
	MAC string `json:"mac,omitempty"`
	// Labels, on ADD, are the endpoint's labels (CNI args.cni.labels and
	// runtimeConfig.labels).
	Labels map[string]string `json:"labels,omitempty"`
	// Early, on ADD, asks overlayd to answer as soon as the address is
	// decided and to confirm, as a second JSON value on the same
	// connection, once the allocation is durable (Client.AddEarly).
	Early bool `json:"early,omitempty"`
}

// validContainerID reports whether s is letters, digits, '_', '.' and '-',
// starting with a letter or digit. validIfName reports whether s is not
// empty and has no '/', ':' or ASCII white space. They are loops rather
// than regexps, which the plugin would compile on every exec.
func validContainerID(s string) bool {
	if s == "" || !isAlnum(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if c := s[i]; !isAlnum(c) && c != '_' && c != '.' && c != '-' {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

func validIfName(s string) bool {
	return s != "" && !strings.ContainsAny(s, "/: \t\n\f\r")
}

// maxIfNameLen is the kernel's limit on an interface name, in bytes
// (IFNAMSIZ less the terminating NUL).
const maxIfNameLen = 15

// maxContainerIDLen bounds a container ID; runtimes use 64 hex digits.
const maxContainerIDLen = 256

// Validate checks the request's fields, naming the bad one.
func (r Request) Validate() error {
	if r.Network == "" {
		return Errorf(CodeInvalidNetwork, "request names no network")
	}
	if len(r.ContainerID) > maxContainerIDLen || !validContainerID(r.ContainerID) {
		return Errorf(CodeInvalidEnvironment, "invalid container ID %q: want letters, digits, '_', '.' or '-', starting with a letter or digit", r.ContainerID)
	}
	if len(r.IfName) > maxIfNameLen || !validIfName(r.IfName) || r.IfName == "." || r.IfName == ".." {
		return Errorf(CodeInvalidEnvironment, "invalid interface name %q", r.IfName)
	}
	if _, err := r.HardwareAddr(); err != nil {
		return &Error{Code: CodeUnsupportedField, Msg: "invalid MAC address", Details: err.Error()}
	}
	if err := (overlay.Endpoint{Labels: r.Labels}).Validate(); err != nil {
		return &Error{Code: CodeInvalidNetwork, Msg: "invalid endpoint labels", Details: err.Error()}
	}
	return nil
}

// HardwareAddr returns the request's MAC address, nil when it has none,
// or an error when it is not a unicast Ethernet address.
func (r Request) HardwareAddr() (net.HardwareAddr, error) {
	if r.MAC == "" {
		return nil, nil
	}
	mac, err := net.ParseMAC(r.MAC)
	if err == nil {
		err = overlay.ValidateMAC(mac)
	}
	if err != nil {
		return nil, fmt.Errorf("mac %q: %w", r.MAC, err)
	}
	return mac, nil
}

// Attachment is what a container interface gets: its address and how to
// wire it.
type Attachment struct {
	// Network is the network's name.
	Network string `json:"network"`
	// Addr is the container's address with its block's prefix length.
	Addr netip.Prefix `json:"addr"`
	// Gateway is the block's gateway on the host's bridge.
	Gateway netip.Addr `json:"gateway"`
	// Subnet is the network's whole address space: the route through the
	// gateway of a container interface that does not take the default
	// route (its container is on another network first). Older overlayds
	// send none.
	Subnet netip.Prefix `json:"subnet,omitzero"`
	// MTU is the MTU for the veth pair.
	MTU int `json:"mtu"`
	// Bridge is the host bridge the veth's host end joins.
	Bridge string `json:"bridge"`
	// MAC is the MAC address the container interface is to have, as
	// text. Older overlayds, and allocations they made, have none.
	MAC string `json:"mac,omitempty"`
	// New is true when this request allocated the address, false when the
	// container interface already held it.
	New bool `json:"new"`
	// Confirm is true when a Confirmation follows this answer (an Early
	// request): the allocation is not durable yet.
	Confirm bool `json:"confirm,omitempty"`
}

// Confirmation is the second value of the answer to an Early ADD: the
// allocation is durable, or the error says why it is not.
type Confirmation struct {
	// Durable is true when the allocation is on disk.
	Durable bool `json:"durable"`
	// Err says why it is not.
	Err *Error `json:"error,omitempty"`
}

// GCRequest asks overlayd to release every address of a network on this
// host that is not held by one of the valid attachments.
type GCRequest struct {
	// Network is the overlay network's name.
	Network string `json:"network"`
	// Valid are the attachments the runtime still uses.
	Valid []overlay.AttachmentKey `json:"valid"`
}

// Validate checks that the request names a network.
func (r GCRequest) Validate() error {
	if r.Network == "" {
		return Errorf(CodeInvalidNetwork, "gc: request names no network")
	}
	return nil
}

// GCResponse lists what a GC released.
type GCResponse struct {
	// Released are the attachments whose addresses were released.
	Released []overlay.AttachmentKey `json:"released"`
}

// Status is the health of one network on this host, as STATUS needs it.
type Status struct {
	// Network is the network's name.
	Network string `json:"network"`
	// Ready is true when an ADD can be served.
	Ready bool `json:"ready"`
	// Degraded is true when ADD can be served but existing containers
	// may have lost connectivity: the dataplane's last pass failed.
	Degraded bool `json:"degraded,omitempty"`
	// Reason says why not ready, or why degraded.
	Reason string `json:"reason,omitempty"`
	// FreeAddresses counts the addresses still free in this host's blocks.
	FreeAddresses int `json:"freeAddresses"`
	// Peers counts the other hosts programmed in the dataplane.
	Peers int `json:"peers"`
}
