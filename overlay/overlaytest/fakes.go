// Package overlaytest provides in-memory fakes of the overlay seams for
// unit tests: a dataplane that keeps its state as text, a block store with
// an allocator, and a membership set by the test.
package overlaytest

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/overlaynet/overlay/overlay"
)

// Dataplane is an in-memory overlay.Dataplane. Its state is the last
// configuration set per network; Text renders it for golden comparisons.
// It is safe for concurrent use.
type Dataplane struct {
	mu    sync.Mutex // guards the fields below
	state map[string]overlay.DataplaneConfig
	sets  int
	err   error // returned by Set, without changing the state, when set
}

var _ overlay.Dataplane = (*Dataplane)(nil)

// Set records cfg as the network's state, or returns the error SetErr set.
func (d *Dataplane) Set(_ context.Context, cfg overlay.DataplaneConfig) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sets++
	if d.err != nil {
		return d.err
	}
	if d.state == nil {
		d.state = make(map[string]overlay.DataplaneConfig)
	}
	d.state[cfg.Network.Name] = cfg
	return nil
}

// Delete forgets the network's state.
func (d *Dataplane) Delete(_ context.Context, n overlay.Network) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.state, n.Name)
	return nil
}

// SetErr makes later calls of Set fail with err (nil to succeed again).
func (d *Dataplane) SetErr(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.err = err
}

// Sets returns how many times Set was called.
func (d *Dataplane) Sets() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sets
}

// Text renders the state of network name: one line per local block, then
// per peer its FDB and neighbour entry and one route per block. It is the
// same text Linux renders from the kernel, so tests of both compare alike.
func (d *Dataplane) Text(name string) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	cfg, ok := d.state[name]
	if !ok {
		return ""
	}
	return ConfigText(cfg)
}

// ConfigText renders a dataplane configuration as sorted lines of text.
func ConfigText(cfg overlay.DataplaneConfig) string {
	var lines []string
	for _, b := range cfg.Blocks {
		lines = append(lines, fmt.Sprintf("gateway %s", netip.PrefixFrom(overlay.Gateway(b), b.Bits())))
	}
	for _, p := range cfg.Peers {
		lines = append(lines, fmt.Sprintf("fdb %s dst %s", p.VTEPMAC, p.Underlay))
		lines = append(lines, fmt.Sprintf("neigh %s lladdr %s", p.Underlay, p.VTEPMAC))
		for _, b := range p.Blocks {
			lines = append(lines, fmt.Sprintf("route %s via %s", b, p.Underlay))
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// Membership is an overlay.Membership whose members the test sets. It is
// safe for concurrent use.
type Membership struct {
	mu      sync.Mutex // guards members
	members []overlay.Member
}

var _ overlay.Membership = (*Membership)(nil)

// Members returns the members last set.
func (m *Membership) Members() []overlay.Member {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.members)
}

// Set replaces the members.
func (m *Membership) Set(members ...overlay.Member) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.members = members
}
