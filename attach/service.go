package attach

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/overlaynet/overlay/overlay"
)

// Networks are the networks this host serves (the daemon's network set).
type Networks interface {
	// Lookup returns the service of network name, or nil and whether
	// the network is known at all (it is starting).
	Lookup(name string) (Attacher, bool)
	// Names returns the names of the networks served, sorted.
	Names() []string
	// Kick asks for the list of networks in etcd to be read again soon.
	Kick()
}

// Service is the attachment service of a host: it hands each request to
// its network. Before the host serves its networks (Serve), and for a
// network that is starting, requests fail with Starting (but Detach, which
// deletes the host veth). For a network the host does not serve it asks
// etcd (exists): one that exists (created a moment ago) is Starting, one
// that does not is UnknownNetwork, naming the networks that exist. It is
// safe for concurrent use.
type Service struct {
	links HostLinks
	nets  atomic.Pointer[networksBox]
}

// networksBox is what Serve gives the service, in one value.
type networksBox struct {
	Networks
	exists func(ctx context.Context, name string) (bool, error)
}

// NewService returns a service that serves nothing yet.
func NewService(links HostLinks) *Service { return &Service{links: links} }

// Serve makes the service hand requests to the networks of n; exists
// reports whether etcd knows a network n does not serve.
func (s *Service) Serve(n Networks, exists func(ctx context.Context, name string) (bool, error)) {
	s.nets.Store(&networksBox{Networks: n, exists: exists})
}

// lookupTimeout bounds the etcd lookup of a network this host does not
// serve.
const lookupTimeout = 2 * time.Second

// network returns the service of network name.
func (s *Service) network(ctx context.Context, name string) (Attacher, error) {
	box := s.nets.Load()
	if box == nil {
		return starting{links: s.links, network: name, why: "overlayd"}, nil
	}
	if a, known := box.Lookup(name); a != nil {
		return a, nil
	} else if known {
		return starting{links: s.links, network: name, why: "network " + name}, nil
	}
	lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	ok, err := box.exists(lctx, name)
	switch {
	case err != nil:
		return nil, errorf(Unavailable, err, "network %q is not served on this host, and etcd cannot be asked whether it exists; try again later", name)
	case ok:
		box.Kick()
		return starting{links: s.links, network: name, why: "network " + name}, nil
	}
	served := strings.Join(box.Names(), ", ")
	if served == "" {
		served = "none"
	}
	return nil, errorf(UnknownNetwork, nil, "unknown network %q: create it first (overlayctl network create %s --cidr ...) or fix the CNI configuration's \"network\"; networks in etcd: %s", name, name, served)
}

// Allocate gives r's container interface an address on r's network.
func (s *Service) Allocate(ctx context.Context, r Request) (Attachment, error) {
	a, err := s.network(ctx, r.Network)
	if err != nil {
		return Attachment{}, err
	}
	return a.Allocate(ctx, r)
}

// Flush returns once the allocations of network decided so far are
// durable.
func (s *Service) Flush(ctx context.Context, network string) error {
	a, err := s.network(ctx, network)
	if err != nil {
		return err
	}
	return a.Flush(ctx)
}

// Detach takes r's container interface off its network. Detaching from a
// network that does not exist succeeds, and deletes the host veth if one
// is left.
func (s *Service) Detach(ctx context.Context, r Request) error {
	a, err := s.network(ctx, r.Network)
	if KindOf(err) == UnknownNetwork {
		a, err = starting{links: s.links, network: r.Network}, nil
	}
	if err != nil {
		return err
	}
	return a.Detach(ctx, r)
}

// Check returns r's attachment.
func (s *Service) Check(ctx context.Context, r Request) (Attachment, error) {
	a, err := s.network(ctx, r.Network)
	if err != nil {
		return Attachment{}, err
	}
	return a.Check(ctx, r)
}

// Status reports whether network can allocate on this host.
func (s *Service) Status(ctx context.Context, network string) (Status, error) {
	a, err := s.network(ctx, network)
	if err != nil {
		return Status{}, err
	}
	return a.Status(ctx)
}

// GC releases the addresses of network on this host that none of valid
// Holder returns the allocation of this host that holds address a of
// network.
func (s *Service) Holder(ctx context.Context, network string, a netip.Addr) (overlay.Allocation, error) {
	n, err := s.network(ctx, network)
	if err != nil {
		return overlay.Allocation{}, err
	}
	return n.Holder(ctx, a)
}

// Release releases address a of network on this host (Network.Release).
func (s *Service) Release(ctx context.Context, network string, a netip.Addr, force bool) (overlay.AttachmentKey, bool, error) {
	n, err := s.network(ctx, network)
	if err != nil {
		return overlay.AttachmentKey{}, false, err
	}
	return n.Release(ctx, a, force)
}

// GC releases every address of network on this host that none of valid
// holds (Network.GC).
func (s *Service) GC(ctx context.Context, network string, valid []overlay.AttachmentKey) ([]overlay.AttachmentKey, error) {
	a, err := s.network(ctx, network)
	if err != nil {
		return nil, err
	}
	return a.GC(ctx, valid)
}

// Allocations returns this host's allocations of network.
func (s *Service) Allocations(ctx context.Context, network string) ([]overlay.Allocation, error) {
	a, err := s.network(ctx, network)
	if err != nil {
		return nil, err
	}
	return a.Allocations(ctx)
}

// starting is the Attacher of a network that is not served yet: every
// operation but Detach fails with Starting, at once, rather than waiting.
// Detach does what the plugin does when overlayd is down: it deletes the
// host veth, and the address is released once the network is up
// (Network.ReleaseOrphans).
type starting struct {
	links   HostLinks
	network string
	// why completes "... is starting".
	why string
}

var _ Attacher = starting{}

func (s starting) err() error {
	return errorf(Starting, nil, "%s is starting; try again in a moment", s.why)
}

func (s starting) Allocate(context.Context, Request) (Attachment, error) {
	return Attachment{}, s.err()
}
func (s starting) Flush(context.Context) error                        { return s.err() }
func (s starting) Check(context.Context, Request) (Attachment, error) { return Attachment{}, s.err() }
func (s starting) GC(context.Context, []overlay.AttachmentKey) ([]overlay.AttachmentKey, error) {
	return nil, s.err()
}

func (s starting) Detach(_ context.Context, r Request) error {
	name := overlay.HostVethName(r.Network, r.Key)
	if err := s.links.Delete(name); err != nil {
		return errorf(Internal, err, "del: delete the host veth %s", name)
	}
	return nil
}

func (s starting) Holder(context.Context, netip.Addr) (overlay.Allocation, error) {
	return overlay.Allocation{}, s.err()
}
func (s starting) Release(context.Context, netip.Addr, bool) (overlay.AttachmentKey, bool, error) {
	return overlay.AttachmentKey{}, false, s.err()
}

func (s starting) Allocations(context.Context) ([]overlay.Allocation, error) {
	return nil, s.err()
}

func (s starting) Status(context.Context) (Status, error) {
	return Status{Network: s.network, Reason: fmt.Sprintf("%s is starting", s.why)}, nil
}
