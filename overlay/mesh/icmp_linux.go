package mesh

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// ipv4Header and icmpHeader are the sizes of the headers a probe of a
// given size carries before its payload.
const (
	ipv4Header = 20
	icmpHeader = 8
)

// ICMP is a Pinger on a raw ICMP socket of the caller's network namespace
// (CAP_NET_RAW), which sets the don't-fragment bit on everything it
// sends: a probe larger than the path's MTU is lost, not fragmented. It
// tells its own echo replies from others' by an identifier of its own.
// It is safe for concurrent use.
type ICMP struct {
	conn *net.IPConn
	id   uint16

	mu      sync.Mutex
	seq     uint16
	waiting map[uint16]waiter
	done    chan struct{}
}

// waiter is a ping waiting for its reply, from dst.
type waiter struct {
	dst netip.Addr
	ch  chan time.Time
}

var _ Pinger = (*ICMP)(nil)

// ListenICMP opens the raw socket and starts reading its replies. Close
// stops it.
func ListenICMP() (*ICMP, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
		})
		return errors.Join(err, serr)
	}}
	pc, err := lc.ListenPacket(context.Background(), "ip4:icmp", "0.0.0.0")
	if err != nil {
		return nil, fmt.Errorf("health mesh: raw ICMP socket (needs CAP_NET_RAW): %w", err)
	}
	c := &ICMP{conn: pc.(*net.IPConn), id: uint16(rand.Uint32()), waiting: make(map[uint16]waiter), done: make(chan struct{})}
	go c.read()
	return c, nil
}

// Close closes the socket; pending pings fail.
func (c *ICMP) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// read hands each echo reply of ours to the ping waiting for it.
func (c *ICMP) read() {
	defer close(c.done)
	buf := make([]byte, 1<<16)
	for {
		n, from, err := c.conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // a socket that keeps failing is not read in a loop
			continue
		}
		now := time.Now()
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
			continue
		}
		echo, ok := m.Body.(*icmp.Echo)
		if !ok || uint16(echo.ID) != c.id {
			continue
		}
		src, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP)
		c.mu.Lock()
		w, ok := c.waiting[uint16(echo.Seq)]
		if ok && w.dst == src.Unmap() {
			delete(c.waiting, uint16(echo.Seq))
		} else {
			ok = false // another pinger's reply, or a stray one
		}
		c.mu.Unlock()
		if ok {
			w.ch <- now
		}
	}
}

// Ping sends an echo request of size bytes, IP header included, to dst
// and waits for its reply until ctx is done (then its error wraps
// context.DeadlineExceeded or context.Canceled).
func (c *ICMP) Ping(ctx context.Context, dst netip.Addr, size int) (time.Duration, error) {
	if size < ipv4Header+icmpHeader {
		size = ipv4Header + icmpHeader
	}
	ch := make(chan time.Time, 1)
	c.mu.Lock()
	seq := c.seq
	for {
		if _, busy := c.waiting[seq]; !busy {
			break
		}
		seq++
	}
	c.seq = seq + 1
	c.waiting[seq] = waiter{dst: dst, ch: ch}
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		if c.waiting[seq].ch == ch {
			delete(c.waiting, seq)
		}
		c.mu.Unlock()
	}
	msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: int(c.id), Seq: int(seq), Data: make([]byte, size-ipv4Header-icmpHeader)}}
	b, err := msg.Marshal(nil)
	if err != nil {
		forget()
		return 0, fmt.Errorf("ping %s: %w", dst, err)
	}
	sent := time.Now()
	if _, err := c.conn.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		forget()
		if errors.Is(err, unix.EMSGSIZE) {
			return 0, fmt.Errorf("send %d bytes to %s: larger than the path's MTU: %w", size, dst, err)
		}
		return 0, fmt.Errorf("send to %s: %w", dst, err)
	}
	select {
	case got := <-ch:
		return got.Sub(sent), nil
	case <-ctx.Done():
		forget()
		return 0, fmt.Errorf("no answer from %s to %d bytes: %w", dst, size, ctx.Err())
	case <-c.done:
		return 0, fmt.Errorf("ping %s: %w", dst, net.ErrClosed)
	}
}
