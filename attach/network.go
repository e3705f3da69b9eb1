package attach

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/hostlink"
)

// Network is the attachment service of one network on this host. It is
// safe for concurrent use.
type Network struct {
	network overlay.Network
	mtu     int
	pool    Pool
	status  func() overlay.Status
	alive   func() int
	links   HostLinks
	bg      context.Context // bounds the deletions DEL leaves running
	log     *slog.Logger

	mu      sync.Mutex // guards pending
	pending map[overlay.AttachmentKey]chan struct{}
}

var _ Attacher = (*Network)(nil)

// NewNetwork returns the service of network n, whose containers get the
// given MTU and addresses from pool; status reports the network's
// reconciler, alive how many other hosts answer gossip, and links are the
// host's veths. The deletions Detach leaves running stop when bg is done.
func NewNetwork(bg context.Context, n overlay.Network, mtu int, pool Pool, status func() overlay.Status, alive func() int, links HostLinks, log *slog.Logger) *Network {
	return &Network{network: n, mtu: mtu, pool: pool, status: status, alive: alive, links: links, bg: bg, log: log,
		pending: make(map[overlay.AttachmentKey]chan struct{})}
}

// StoreTimeout bounds the allocation store's work in one request, so
// that a store that hangs gives "try again later" (Unavailable) well
// within a front end's own limit rather than a hung request. overlayd's store is the
// host's own disk; etcd gets a copy in the background.
const StoreTimeout = 10 * time.Second

// Allocate allocates the container interface's address and endpoint, or
// returns those it already holds. The endpoint's MAC address is the one
// the front end will give the interface (it picks one when the runtime
// did not): a request with none, from a front end that leaves the choice
// to the kernel, records none. The allocation is decided, not yet
// durable: the answer waits for Flush.
func (d *Network) Allocate(ctx context.Context, r Request) (Attachment, error) {
	ep := r.Endpoint
	if err := ep.Validate(); err != nil {
		return Attachment{}, errorf(Invalid, err, "add: the endpoint")
	}
	ctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	key := r.Key
	if err := d.waitPending(ctx, key); err != nil {
		return Attachment{}, errorf(Unavailable, err, "add: the previous attachment of this interface is still being deleted")
	}
	var al overlay.Allocation
	var err error
	if r.IP.IsValid() {
		al, err = d.pool.AllocateAddr(ctx, key, r.IP, ep)
	} else {
		al, err = d.pool.Allocate(ctx, key, ep)
	}
	if err != nil {
		return Attachment{}, storeError("add", err)
	}
	if al.New {
		d.log.Debug("allocated", "container", key.ContainerID, "ifname", key.IfName, "addr", al.Addr)
	}
	return d.attachment(al), nil
}

// Flush returns once every allocation and release of the network decided
// so far is durable: a front end calls it before it tells a runtime an
// address is its own.
func (d *Network) Flush(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	if err := d.pool.Flush(ctx); err != nil {
		return storeError("add", err)
	}
	return nil
}

// Detach detaches the container interface's host veth (down and off the
// bridge: its traffic stops at once), releases its address and answers;
// the veth is deleted, and the release made durable, in the background.
// The address is free when DEL returns, so that a runtime that recreates
// the container with the same static address (CNI "ips") gets it at once:
// the old veth can carry no traffic while the kernel deletes it, which is
// most of what a DEL would otherwise wait for. A release that fails (a
// disk error) is retried in the background until it succeeds or overlayd
// stops; a restarted overlayd finishes what was pending (ReleaseOrphans).
func (d *Network) Detach(ctx context.Context, r Request) error {
	key := r.Key
	name := overlay.HostVethName(d.network.Name, key)
	if err := d.links.Detach(name); err != nil {
		return errorf(Internal, err, "del: detach the host veth %s", name)
	}
	// Pending before released: an ADD of the same interface from now on
	// waits for the old veth to go.
	done, first := d.startPending(key)
	rctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	err := d.pool.Release(rctx, key)
	cancel()
	if err != nil {
		d.log.Warn("releasing an address failed; retrying in the background", "container", key.ContainerID, "ifname", key.IfName, "err", err)
	}
	if first {
		go d.finishDelete(key, name, err == nil, done)
	}
	return nil
}

// waitPending waits until no deletion of key is pending.
func (d *Network) waitPending(ctx context.Context, key overlay.AttachmentKey) error {
	d.mu.Lock()
	done, ok := d.pending[key]
	d.mu.Unlock()
	if !ok {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// releaseRetry bounds the wait between two tries of a release or of a
// veth's deletion.
const releaseRetry = 30 * time.Second

// startPending marks a deletion of key pending and returns the channel to
// close when it is done, and true; or, when one is pending already, false.
func (d *Network) startPending(key overlay.AttachmentKey) (chan struct{}, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.pending[key]; ok {
		return nil, false
	}
	done := make(chan struct{})
	d.pending[key] = done
	return done, true
}

// finishDelete makes the release of key's address durable, releasing it
// first unless released, then deletes the host veth name, and then ends
// the pending deletion by closing done.
func (d *Network) finishDelete(key overlay.AttachmentKey, name string, released bool, done chan struct{}) {
	defer func() {
		d.mu.Lock()
		delete(d.pending, key)
		d.mu.Unlock()
		close(done)
	}()
	ok := d.retry(key, "releasing an address", func(ctx context.Context) error {
		if !released {
			if err := d.pool.Release(ctx, key); err != nil {
				return err
			}
			released = true
		}
		return d.pool.Flush(ctx)
	})
	if !ok {
		return
	}
	d.log.Debug("released", "container", key.ContainerID, "ifname", key.IfName)
	d.retry(key, "deleting the host veth "+name, func(context.Context) error { return d.links.Delete(name) })
}

// retry calls fn until it succeeds, and reports true, or overlayd stops,
// waiting longer after each failure, up to releaseRetry.
func (d *Network) retry(key overlay.AttachmentKey, what string, fn func(context.Context) error) bool {
	wait := time.Second
	for {
		ctx, cancel := context.WithTimeout(d.bg, StoreTimeout)
		err := fn(ctx)
		cancel()
		if err == nil {
			return true
		}
		d.log.Warn(what+" failed; retrying", "container", key.ContainerID, "ifname", key.IfName, "err", err, "retry", wait)
		select {
		case <-d.bg.Done():
			return false
		case <-time.After(wait):
		}
		wait = min(2*wait, releaseRetry)
	}
}

// Check returns the container interface's attachment.
func (d *Network) Check(ctx context.Context, r Request) (Attachment, error) {
	ctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	key := r.Key
	al, err := d.pool.Lookup(ctx, key)
	if err != nil {
		return Attachment{}, storeError("check", err)
	}
	if mtu, stale := d.staleMTU(key); stale {
		return Attachment{}, errorf(Internal, nil, "check: the container's interface has MTU %d but network %s now has %d (the underlay's MTU changed): recreate the container", mtu, d.network.Name, d.mtu)
	}
	return d.attachment(al), nil
}

// StaleMTU returns the allocations of list whose veth has an MTU other
// than the network's: containers created before the underlay's MTU
// changed, which keep theirs until they are recreated.
func (d *Network) StaleMTU(list []overlay.Allocation) map[overlay.AttachmentKey]int {
	out := make(map[overlay.AttachmentKey]int)
	for _, al := range list {
		if mtu, stale := d.staleMTU(al.Key); stale {
			out[al.Key] = mtu
		}
	}
	return out
}

// staleMTU returns the MTU of key's host veth, and whether it differs
// from the network's. A veth that is gone, or cannot be read, is not.
func (d *Network) staleMTU(key overlay.AttachmentKey) (int, bool) {
	mtu, err := d.links.MTU(overlay.HostVethName(d.network.Name, key))
	return mtu, err == nil && mtu != 0 && mtu != d.mtu
}

// Status reports whether an ADD can be served: a block is held, the
// dataplane was programmed, and an address is free.
func (d *Network) Status(ctx context.Context) (Status, error) {
	st := Status{Network: d.network.Name}
	rs := d.status()
	st.Peers = len(rs.Config.Peers)
	held := d.pool.Held()
	free, full := d.pool.Headroom()
	st.FreeAddresses = free
	switch {
	case len(held) == 0 && full == nil:
		st.Reason = "this host holds no block"
	case rs.Passes == rs.Failures:
		st.Reason = fmt.Sprintf("the dataplane was never programmed: %v", rs.LastErr)
	case full != nil:
		st.Reason = full.Error()
	default:
		st.Ready = true
		switch {
		case rs.LastErr != nil:
			st.Degraded = true
			st.Reason = fmt.Sprintf("the dataplane's last pass failed: %v", rs.LastErr)
		case st.Peers > 0 && d.alive() == 0:
			st.Degraded = true
			st.Reason = fmt.Sprintf("none of the %d other hosts answers gossip: check the underlay between hosts", st.Peers)
		}
	}
	return st, nil
}

// DockerKeyPrefix starts the container IDs of the attachments that the
// Docker front end makes. A CNI container ID cannot hold its ':' (CNI
// allows letters, digits, '_', '.' and '-'), so the two never meet, and a
// CNI runtime's GC, which knows only its own containers, leaves the
// Docker front end's alone.
const DockerKeyPrefix = "docker:"

// GC releases every address of this host's blocks that none of r.Valid
// holds. The runtime must not run ADD for the network while it runs GC
// (CNI spec): an ADD in flight is not in its list.
func (d *Network) GC(ctx context.Context, keep []overlay.AttachmentKey) ([]overlay.AttachmentKey, error) {
	valid := make(map[overlay.AttachmentKey]bool, len(keep))
	for _, k := range keep {
		valid[k] = true
	}
	lctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	list, err := d.pool.List(lctx)
	cancel()
	if err != nil {
		return nil, storeError("gc", err)
	}
	out := []overlay.AttachmentKey{}
	for _, al := range list {
		if valid[al.Key] || strings.HasPrefix(al.Key.ContainerID, DockerKeyPrefix) {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, StoreTimeout)
		err := d.pool.Release(rctx, al.Key)
		cancel()
		if err != nil {
			return out, storeError("gc", err)
		}
		d.log.Info("gc released", "container", al.Key.ContainerID, "ifname", al.Key.IfName, "addr", al.Addr)
		out = append(out, al.Key)
	}
	fctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	if err := d.pool.Flush(fctx); err != nil {
		return out, storeError("gc", err)
	}
	return out, nil
}

// Allocations returns this host's allocations: what ReleaseOrphans is
// given, read before overlayd serves its socket.
func (d *Network) Allocations(ctx context.Context) ([]overlay.Allocation, error) {
	ctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	list, err := d.pool.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list allocations: %w", err)
	}
	return list, nil
}

// ReleaseOrphans releases the addresses of list whose container interface
// has no host veth any more, deleting first a veth that DEL had detached
// but not yet deleted. It is how an address whose DEL came while overlayd
// was down, or whose host was rebooted, or whose deletion a stop cut
// short, is given back. overlayd gives it the allocations that existed
// when it started, once every plugin request from before its start has
// ended (OrphanGrace): an ADD answered just before a restart may not have
// made its veth yet. The Docker front end's attachments are left to it: a
// Docker endpoint has no veth between dockerd's RequestAddress and its
// Join. It returns the attachments it released.
func (d *Network) ReleaseOrphans(ctx context.Context, list []overlay.Allocation) ([]overlay.AttachmentKey, error) {
	ctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	var released []overlay.AttachmentKey
	var errs []error
	for _, al := range list {
		if strings.HasPrefix(al.Key.ContainerID, DockerKeyPrefix) {
			continue // the Docker front end's to collect, by its rules
		}
		name := overlay.HostVethName(d.network.Name, al.Key)
		state, err := d.links.State(name)
		if err != nil || state == hostlink.Attached {
			errs = append(errs, err)
			continue
		}
		if state == hostlink.Detached {
			if err := d.links.Delete(name); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		if err := d.pool.Release(ctx, al.Key); err != nil {
			errs = append(errs, err)
			continue
		}
		d.log.Info("released the address of a container whose veth is gone", "container", al.Key.ContainerID, "ifname", al.Key.IfName, "addr", al.Addr)
		released = append(released, al.Key)
	}
	if err := d.pool.Flush(ctx); err != nil {
		errs = append(errs, err)
	}
	return released, errors.Join(errs...)
}

func (d *Network) attachment(al overlay.Allocation) Attachment {
	block := al.Addr.Masked()
	return Attachment{
		Network: d.network.Name,
		Addr:    al.Addr,
		Gateway: overlay.Gateway(block),
		Subnet:  d.network.CIDR,
		MTU:     d.mtu,
		Bridge:  d.network.BridgeName(),
		MAC:     al.Endpoint.MAC,
		Labels:  al.Endpoint.Labels,
		New:     al.New,
	}
}

// storeError maps a store failure to a Kind: no free address, unknown
// container, a conflict, or (for a store failure) try again later.
func storeError(op string, err error) error {
	switch {
	case errors.Is(err, overlay.ErrPoolExhausted):
		return errorf(NoAddress, err, "no free address")
	case errors.Is(err, overlay.ErrNotFound):
		return errorf(NotFound, err, "container interface holds no address")
	case errors.Is(err, overlay.ErrConflict):
		return errorf(Internal, err, "%s failed", op)
	}
	return errorf(Unavailable, err, "%s: the allocation store failed; try again later", op)
}

// Release releases the address a of the network on this host, which a
// container holds that its runtime never sent DEL for (a leaked address):
// an operator's act, through overlayctl. It refuses, with Kind Invalid,
// while the container's host veth is attached to the bridge (the
// container may still run: its runtime should DEL it) unless force is
// set; a veth left over is deleted first. It returns the container
// interface that held the address and whether a veth was deleted, or
// an error of Kind NotFound when no container of this host holds a.
func (d *Network) Release(ctx context.Context, a netip.Addr, force bool) (overlay.AttachmentKey, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	list, err := d.pool.List(ctx)
	if err != nil {
		return overlay.AttachmentKey{}, false, storeError("release", err)
	}
	i := slices.IndexFunc(list, func(al overlay.Allocation) bool { return al.Addr.Addr() == a })
	if i < 0 {
		return overlay.AttachmentKey{}, false, errorf(NotFound, nil, "release: no container on this host holds %s on network %s (`overlayctl address holder %s %s` says which host's block it is in)", a, d.network.Name, d.network.Name, a)
	}
	key := list[i].Key
	d.mu.Lock()
	_, pending := d.pending[key]
	d.mu.Unlock()
	if pending {
		return key, false, errorf(Unavailable, nil, "release: container %s interface %s is being deleted (a DEL in progress): its address is free in a moment", key.ContainerID, key.IfName)
	}
	name := overlay.HostVethName(d.network.Name, key)
	state, err := d.links.State(name)
	if err != nil {
		return key, false, errorf(Internal, err, "release: read the host veth %s", name)
	}
	if state == hostlink.Attached && !force {
		return key, false, errorf(Invalid, nil, "release: container %s interface %s holds %s and its host veth %s is still attached: the container may still run; delete it through its runtime (CNI DEL), or release with --force to cut it off", key.ContainerID, key.IfName, a, name)
	}
	deleted := false
	if state != hostlink.Gone {
		if err := d.links.Delete(name); err != nil {
			return key, false, errorf(Internal, err, "release: delete the host veth %s", name)
		}
		deleted = true
	}
	if err := d.pool.Release(ctx, key); err != nil {
		return key, deleted, storeError("release", err)
	}
	if err := d.pool.Flush(ctx); err != nil {
		return key, deleted, storeError("release", err)
	}
	d.log.Info("released a leaked address at an operator's request", "container", key.ContainerID, "ifname", key.IfName, "addr", a, "veth-deleted", deleted, "force", force)
	return key, deleted, nil
}

// Holder returns the allocation of this host that holds address a, or
// an error of Kind NotFound.
func (d *Network) Holder(ctx context.Context, a netip.Addr) (overlay.Allocation, error) {
	ctx, cancel := context.WithTimeout(ctx, StoreTimeout)
	defer cancel()
	list, err := d.pool.List(ctx)
	if err != nil {
		return overlay.Allocation{}, storeError("holder", err)
	}
	for _, al := range list {
		if al.Addr.Addr() == a {
			return al, nil
		}
	}
	return overlay.Allocation{}, errorf(NotFound, nil, "no container on this host holds %s on network %s", a, d.network.Name)
}
