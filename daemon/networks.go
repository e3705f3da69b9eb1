package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/internal/backoff"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/mesh"
)

// network is one network's runtime on this host, as the network set
// drives it (netRuntime).
type network interface {
	// Run runs the network's loops until ctx is done, and returns ctx's
	// error or the error of a loop that failed.
	Run(ctx context.Context) error
	// Attacher serves the network's attachments.
	Attacher() attach.Attacher
	// Kick asks the network's reconcile loop for a pass.
	Kick()
	// LastPass returns when the network's reconcile loop last ended a
	// pass, failed or not.
	LastPass() time.Time
	// Remove removes the network from this host once it is deleted in
	// etcd: its devices, its containers' host veths and this host's
	// record of its allocations. It is called after Run has returned.
	Remove(ctx context.Context)
	// Close releases what the runtime holds (its lock, its metrics); the
	// dataplane stays in place.
	Close()
	// Inspect returns the network's status on this host.
	Inspect(ctx context.Context) ctlapi.NetworkStatus
	// Doctor checks the network on this host and returns what it found.
	Doctor(ctx context.Context) []ctlapi.Finding
	// Release releases a leaked address of the network.
	Release(ctx context.Context, a netip.Addr, force bool) (ctlapi.ReleaseResponse, error)
	// MeshTargets returns the peers the health mesh probes on the
	// network.
	MeshTargets() []mesh.Target
}

// networkSet runs one network runtime for every network in etcd: it
// starts the runtimes of the networks created and stops and removes
// those of the networks deleted, from a list that a watch refreshes
// (Kick) and that is read again every resync interval. It is safe for
// concurrent use.
type networkSet struct {
	// list returns every network in etcd.
	list func(ctx context.Context) ([]overlay.Network, error)
	// start starts the runtime of n: its first block and first
	// dataplane pass. It fails when the network cannot be served yet.
	start func(ctx context.Context, n overlay.Network) (network, error)
	// converge brings the host-wide state to the networks listed, after
	// the runtimes of deleted networks are stopped, beside the starts of
	// new ones (which serve only once it returns): the firewall's rules,
	// and the removal of networks no runtime serves that etcd no longer
	// lists (deleted while overlayd was down).
	converge func(ctx context.Context, defs []overlay.Network)
	// resync is how often the list is read when nothing changed; retry
	// how long after a failed start it is tried again.
	resync, retry time.Duration
	log           *slog.Logger

	kick chan struct{}

	mu   sync.Mutex
	nets map[string]*entry // by name
	wg   sync.WaitGroup    // the entries' goroutines
}

// entry is one network the set serves.
type entry struct {
	def     overlay.Network
	cancel  context.CancelFunc
	started chan struct{} // closed when start returned
	done    chan struct{} // closed when the runtime is closed
	deleted bool          // remove on stop; guarded by networkSet.mu
	net     network       // nil until started; guarded by networkSet.mu
}

// newNetworkSet returns an empty set; Run fills it.
func newNetworkSet(list func(context.Context) ([]overlay.Network, error), start func(context.Context, overlay.Network) (network, error),
	converge func(context.Context, []overlay.Network), resync, retry time.Duration, log *slog.Logger) *networkSet {
	return &networkSet{list: list, start: start, converge: converge, resync: resync, retry: retry, log: log,
		kick: make(chan struct{}, 1), nets: make(map[string]*entry)}
}

// Kick asks for the list to be read again soon. It never blocks.
func (s *networkSet) Kick() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// KickAll asks every running network's reconcile loop for a pass.
func (s *networkSet) KickAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.nets {
		if e.net != nil {
			e.net.Kick()
		}
	}
}

// listTimeout bounds one read of the list of networks.
const listTimeout = 5 * time.Second

// Start starts the runtime of every network of defs, the list as overlayd
// read it at start, and returns once each has started or failed to:
// overlayd says it is ready then. A network that fails to start is logged
// and tried again by Run.
func (s *networkSet) Start(ctx context.Context, defs []overlay.Network) {
	for _, e := range s.sync(ctx, defs) {
		<-e.started
	}
}

// Run keeps the set equal to the list of networks until ctx is done,
// then stops every runtime (leaving their dataplanes in place). It
// returns ctx's error.
func (s *networkSet) Run(ctx context.Context) error {
	defer s.stopAll()
	t := time.NewTicker(s.resync)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.kick:
		case <-t.C:
		}
		lctx, cancel := context.WithTimeout(ctx, listTimeout)
		defs, err := s.list(lctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			s.log.Warn("listing the networks in etcd failed; keeping those running", "err", err)
		}
		if defs == nil && err != nil {
			continue // never stop a network because etcd cannot be read
		}
		s.sync(ctx, defs)
	}
}

// sync starts the runtimes of defs that do not run and stops (and
// removes) those of networks not in defs, or defined anew under the same
// name. It returns the entries it started.
func (s *networkSet) sync(ctx context.Context, defs []overlay.Network) []*entry {
	want := make(map[string]overlay.Network, len(defs))
	for _, n := range defs {
		want[n.Name] = n
	}
	s.mu.Lock()
	var gone []*entry
	for name, e := range s.nets {
		if n, ok := want[name]; !ok || n.ID != e.def.ID || n.Diff(e.def) != "" {
			e.deleted = true
			gone = append(gone, e)
			delete(s.nets, name)
		}
	}
	s.mu.Unlock()
	for _, e := range gone {
		s.log.Info("network deleted in etcd; removing it from this host", "network", e.def.Name)
		e.cancel()
		<-e.done
	}

	// The host-wide state beside the new runtimes' starts, which wait for
	// it before they serve: a new network is isolated before its first
	// ADD, and the start of a host does not wait for nftables' commit.
	converged := make(chan struct{})
	go func() {
		defer close(converged)
		s.converge(ctx, defs)
	}()
	defer func() { <-converged }()

	var started []*entry
	s.mu.Lock()
	for _, n := range defs {
		if _, ok := s.nets[n.Name]; ok {
			continue
		}
		ectx, cancel := context.WithCancel(ctx)
		e := &entry{def: n, cancel: cancel, started: make(chan struct{}), done: make(chan struct{})}
		s.nets[n.Name] = e
		started = append(started, e)
		s.wg.Add(1)
		go s.serve(ectx, e, converged)
	}
	s.mu.Unlock()
	return started
}

// serve starts e's runtime, serves it once converged is closed, and runs
// it until its context is done.
func (s *networkSet) serve(ctx context.Context, e *entry, converged <-chan struct{}) {
	defer s.wg.Done()
	defer close(e.done)
	log := s.log.With("network", e.def.Name)
	n, err := s.start(ctx, e.def)
	<-converged
	if err != nil {
		close(e.started)
		if ctx.Err() == nil {
			retry := backoff.Jitter(s.retry, 0.5, rand.Float64())
			log.Error("starting the network failed; retrying", "err", err, "retry", retry)
			s.forget(e)
			time.AfterFunc(retry, s.Kick)
		}
		return
	}
	s.mu.Lock()
	e.net = n
	s.mu.Unlock()
	close(e.started)
	err = n.Run(ctx)
	if ctx.Err() == nil {
		// A loop failed on its own: start the network again.
		log.Error("the network's runtime failed; restarting it", "err", err)
		s.forget(e)
		s.Kick()
	}
	s.mu.Lock()
	deleted := e.deleted
	s.mu.Unlock()
	if deleted {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storeTimeout)
		n.Remove(rctx)
		cancel()
	}
	n.Close()
}

// forget drops e from the set, unless the set holds another entry by
// now.
func (s *networkSet) forget(e *entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nets[e.def.Name] == e {
		delete(s.nets, e.def.Name)
	}
}

// stopAll stops every runtime and waits for them.
func (s *networkSet) stopAll() {
	s.mu.Lock()
	for _, e := range s.nets {
		e.cancel()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

var _ attach.Networks = (*networkSet)(nil)

// Lookup returns the network's attachment service, or nil with whether
// the set knows the network (it is starting) at all.
func (s *networkSet) Lookup(name string) (attach.Attacher, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.nets[name]
	if !ok || e.net == nil {
		return nil, ok
	}
	return e.net.Attacher(), true
}

// Stalled returns an error naming the networks whose reconcile loop has
// ended no pass in the after before now, or nil when every loop moves. A
// network still starting is not one of them.
func (s *networkSet) Stalled(now time.Time, after time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var stuck []string
	for name, e := range s.nets {
		if e.net != nil && now.Sub(e.net.LastPass()) > after {
			stuck = append(stuck, name)
		}
	}
	if len(stuck) == 0 {
		return nil
	}
	slices.Sort(stuck)
	return fmt.Errorf("the reconcile loop of network %s has ended no pass for more than %s", strings.Join(stuck, ", "), after)
}

// Started returns the runtimes of the networks the set serves that have
// started, sorted by name.
func (s *networkSet) Started() []network {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.nets))
	for name, e := range s.nets {
		if e.net != nil {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	out := make([]network, len(names))
	for i, name := range names {
		out[i] = s.nets[name].net
	}
	return out
}

// Runtime returns the runtime of network name, if it has started.
func (s *networkSet) Runtime(name string) (network, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.nets[name]
	if !ok || e.net == nil {
		return nil, false
	}
	return e.net, true
}

// Names returns the names of the networks the set serves, sorted.
func (s *networkSet) Names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.nets))
	for name := range s.nets {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}
