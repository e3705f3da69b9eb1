package daemon

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/vishvananda/netlink"
)

// LinkState is what the host says of a container's host veth.
type LinkState int

// The states of a host veth.
const (
	// LinkGone means there is no such link: nothing can hold the
	// attachment's address.
	LinkGone LinkState = iota
	// LinkAttached means the link is on a bridge or up: in use.
	LinkAttached
	// LinkDetached means the link is down and off any bridge, as DEL
	// leaves it until it is deleted: a pending deletion.
	LinkDetached
)

// HostLinks are the host-side veths of containers, by name. Its methods
// are safe for concurrent use and block on the kernel.
type HostLinks interface {
	// State reports the state of the link.
	State(name string) (LinkState, error)
	// Detach sets the link down and takes it off its bridge: traffic
	// stops at once. A link that does not exist is not an error.
	Detach(name string) error
	// Delete deletes the link, and with it the container's end. A link
	// that does not exist is not an error.
	Delete(name string) error
}

// netlinkLinks is HostLinks on a netlink handle of the host's namespace.
type netlinkLinks struct{ h *netlink.Handle }

var _ HostLinks = netlinkLinks{}

func (n netlinkLinks) link(name string) (netlink.Link, error) {
	l, err := n.h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find link %s: %w", name, err)
	}
	return l, nil
}

func (n netlinkLinks) State(name string) (LinkState, error) {
	l, err := n.link(name)
	switch {
	case err != nil:
		return LinkGone, err
	case l == nil:
		return LinkGone, nil
	case l.Attrs().MasterIndex == 0 && l.Attrs().Flags&net.FlagUp == 0:
		return LinkDetached, nil
	}
	return LinkAttached, nil
}

func (n netlinkLinks) Detach(name string) error {
	l, err := n.link(name)
	if err != nil || l == nil {
		return err
	}
	// The link may vanish under us (its namespace being destroyed takes
	// the pair with it): gone is what a detach wants anyway.
	if err := n.h.LinkSetDown(l); err != nil && !vanished(err) {
		return fmt.Errorf("set %s down: %w", name, err)
	}
	if err := n.h.LinkSetNoMaster(l); err != nil && !vanished(err) {
		return fmt.Errorf("take %s off its bridge: %w", name, err)
	}
	return nil
}

func (n netlinkLinks) Delete(name string) error {
	l, err := n.link(name)
	if err != nil || l == nil {
		return err
	}
	if err := n.h.LinkDel(l); err != nil && !vanished(err) {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

// vanished reports whether err says the link no longer exists.
func vanished(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, syscall.ENODEV) || errors.Is(err, syscall.ENOENT)
}
