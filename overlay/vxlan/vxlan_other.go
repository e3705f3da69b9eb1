//go:build !linux

package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/overlaynet/overlay/overlay"
)

// errNotLinux is returned by every operation on other systems than Linux.
var errNotLinux = fmt.Errorf("vxlan: the dataplane needs Linux: %w", errors.ErrUnsupported)

// Set fails: the dataplane needs Linux.
func (l *Linux) Set(context.Context, overlay.DataplaneConfig) error { return errNotLinux }

// Delete fails: the dataplane needs Linux.
func (l *Linux) Delete(context.Context, overlay.Network) error { return errNotLinux }

// Text fails: the dataplane needs Linux.
func (l *Linux) Text(overlay.Network) (string, error) { return "", errNotLinux }

// Check fails: the dataplane needs Linux.
func (l *Linux) Check(context.Context, overlay.DataplaneConfig) ([]overlay.Difference, error) {
	return nil, errNotLinux
}

// NeighSocket lists FDB and neighbour entries; it exists only on Linux.
type NeighSocket struct{}

// OpenNeighSocket fails: the dataplane needs Linux.
func OpenNeighSocket(netns.NsHandle) (*NeighSocket, error) { return nil, errNotLinux }

// Close does nothing.
func (f *NeighSocket) Close() {}

// DetectUnderlay fails: the dataplane needs Linux.
func DetectUnderlay(*netlink.Handle, netip.Addr) (Underlay, error) { return Underlay{}, errNotLinux }
