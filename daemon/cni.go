package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/overlay"
)

// Pool is what the CNI handler needs of a network's store: the host's
// blocks and its address allocator.
type Pool interface {
	overlay.Allocator
	Held() []netip.Prefix
}

// CNIHandler serves the CNI socket for one network on this host. It is
// safe for concurrent use.
type CNIHandler struct {
	network overlay.Network
	mtu     int
	pool    Pool
	status  func() overlay.Status
	alive   func() int
	log     *slog.Logger
}

var _ rpcserver.Handler = (*CNIHandler)(nil)

// NewCNIHandler returns the handler of network n, whose containers get
// the given MTU and addresses from pool; status reports the network's
// reconciler, and alive how many other hosts answer gossip.
func NewCNIHandler(n overlay.Network, mtu int, pool Pool, status func() overlay.Status, alive func() int, log *slog.Logger) *CNIHandler {
	return &CNIHandler{network: n, mtu: mtu, pool: pool, status: status, alive: alive, log: log}
}

// storeTimeout bounds the etcd work of one CNI request. The etcd client
// waits for a connection rather than failing, so without a bound an etcd
// outage would hang every ADD until the plugin gave up; with it, the
// plugin answers "try again later" (code 11) well within its own limit.
const storeTimeout = 10 * time.Second

// reservedPerBlock counts the addresses of a block no container gets:
// the network address, the gateway and the broadcast address.
const reservedPerBlock = 3

// Add allocates the container interface's address, or returns the one it
// already holds.
func (d *CNIHandler) Add(ctx context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	if err := d.checkNetwork(r.Network); err != nil {
		return cnirpc.Attachment{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	key := overlay.AttachmentKey{ContainerID: r.ContainerID, IfName: r.IfName}
	var al overlay.Allocation
	var err error
	if r.IP.IsValid() {
		al, err = d.pool.AllocateAddr(ctx, key, r.IP)
	} else {
		al, err = d.pool.Allocate(ctx, key)
	}
	if err != nil {
		return cnirpc.Attachment{}, storeError("add", err)
	}
	if al.New {
		d.log.Info("allocated", "container", r.ContainerID, "ifname", r.IfName, "addr", al.Addr)
	}
	return d.attachment(al), nil
}

// Del releases the container interface's address.
func (d *CNIHandler) Del(ctx context.Context, r cnirpc.Request) error {
	if err := d.checkNetwork(r.Network); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	key := overlay.AttachmentKey{ContainerID: r.ContainerID, IfName: r.IfName}
	if err := d.pool.Release(ctx, key); err != nil {
		return storeError("del", err)
	}
	d.log.Info("released", "container", r.ContainerID, "ifname", r.IfName)
	return nil
}

// Check returns the container interface's attachment.
func (d *CNIHandler) Check(ctx context.Context, r cnirpc.Request) (cnirpc.Attachment, error) {
	if err := d.checkNetwork(r.Network); err != nil {
		return cnirpc.Attachment{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	al, err := d.pool.Lookup(ctx, overlay.AttachmentKey{ContainerID: r.ContainerID, IfName: r.IfName})
	if err != nil {
		return cnirpc.Attachment{}, storeError("check", err)
	}
	return d.attachment(al), nil
}

// Status reports whether an ADD can be served: a block is held, the
// dataplane was programmed, and an address is free.
func (d *CNIHandler) Status(ctx context.Context, network string) (cnirpc.Status, error) {
	if err := d.checkNetwork(network); err != nil {
		return cnirpc.Status{}, err
	}
	st := cnirpc.Status{Network: network}
	rs := d.status()
	st.Peers = len(rs.Config.Peers)
	held := d.pool.Held()
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	list, err := d.pool.List(ctx)
	if err != nil {
		return cnirpc.Status{}, storeError("status", err)
	}
	for _, b := range held {
		st.FreeAddresses += 1<<(32-b.Bits()) - reservedPerBlock
	}
	st.FreeAddresses = max(0, st.FreeAddresses-len(list))
	switch {
	case len(held) == 0:
		st.Reason = "this host holds no block"
	case rs.Passes == rs.Failures:
		st.Reason = fmt.Sprintf("the dataplane was never programmed: %v", rs.LastErr)
	case st.FreeAddresses == 0:
		st.Reason = "no free address in this host's blocks"
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

// GC releases every address of this host's blocks that none of r.Valid
// holds. The runtime must not run ADD for the network while it runs GC
// (CNI spec): an ADD in flight is not in its list.
func (d *CNIHandler) GC(ctx context.Context, r cnirpc.GCRequest) (cnirpc.GCResponse, error) {
	if err := d.checkNetwork(r.Network); err != nil {
		return cnirpc.GCResponse{}, err
	}
	valid := make(map[overlay.AttachmentKey]bool, len(r.Valid))
	for _, k := range r.Valid {
		valid[k] = true
	}
	lctx, cancel := context.WithTimeout(ctx, storeTimeout)
	list, err := d.pool.List(lctx)
	cancel()
	if err != nil {
		return cnirpc.GCResponse{}, storeError("gc", err)
	}
	out := cnirpc.GCResponse{Released: []overlay.AttachmentKey{}}
	for _, al := range list {
		if valid[al.Key] {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, storeTimeout)
		err := d.pool.Release(rctx, al.Key)
		cancel()
		if err != nil {
			return out, storeError("gc", err)
		}
		d.log.Info("gc released", "container", al.Key.ContainerID, "ifname", al.Key.IfName, "addr", al.Addr)
		out.Released = append(out.Released, al.Key)
	}
	return out, nil
}

// ReleaseOrphans releases every address of this host whose container
// interface has no host veth any more (exists reports whether a link
// does). overlayd runs it at start, before it serves the socket: it is how
// an address whose DEL came while overlayd was down, or whose host was
// rebooted, is given back. It returns the attachments it released.
func (d *CNIHandler) ReleaseOrphans(ctx context.Context, exists func(name string) (bool, error)) ([]overlay.AttachmentKey, error) {
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	list, err := d.pool.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("list allocations: %w", err)
	}
	var released []overlay.AttachmentKey
	var errs []error
	for _, al := range list {
		ok, err := exists(cnirpc.HostVethName(d.network.Name, al.Key))
		if err != nil || ok {
			errs = append(errs, err)
			continue
		}
		if err := d.pool.Release(ctx, al.Key); err != nil {
			errs = append(errs, err)
			continue
		}
		d.log.Info("released the address of a container whose veth is gone", "container", al.Key.ContainerID, "ifname", al.Key.IfName, "addr", al.Addr)
		released = append(released, al.Key)
	}
	return released, errors.Join(errs...)
}

func (d *CNIHandler) checkNetwork(name string) error {
	if name != d.network.Name {
		return cnirpc.Errorf(cnirpc.CodeInvalidNetwork, "unknown network %q: this overlayd serves %q", name, d.network.Name)
	}
	return nil
}

func (d *CNIHandler) attachment(al overlay.Allocation) cnirpc.Attachment {
	block := al.Addr.Masked()
	return cnirpc.Attachment{
		Network: d.network.Name,
		Addr:    al.Addr,
		Gateway: overlay.Gateway(block),
		MTU:     d.mtu,
		Bridge:  d.network.BridgeName(),
		New:     al.New,
	}
}

// storeError maps a store failure to a CNI error code: no free address,
// unknown container, or (for anything from etcd) try again later.
func storeError(op string, err error) error {
	switch {
	case errors.Is(err, overlay.ErrPoolExhausted):
		return &cnirpc.Error{Code: cnirpc.CodeNoAddress, Msg: "no free address", Details: err.Error()}
	case errors.Is(err, overlay.ErrNotFound):
		return &cnirpc.Error{Code: cnirpc.CodeUnknownContainer, Msg: "container interface holds no address", Details: err.Error()}
	case errors.Is(err, overlay.ErrConflict):
		return &cnirpc.Error{Code: cnirpc.CodeInternal, Msg: op + " failed", Details: err.Error()}
	}
	return &cnirpc.Error{Code: cnirpc.CodeTryAgainLater, Msg: op + ": etcd is unavailable or failing; try again later", Details: err.Error()}
}
