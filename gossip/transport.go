package gossip

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Traffic counts what gossip sent and received through its transport,
// encryption and framing included.
type Traffic struct {
	// PacketsSent and PacketsReceived count UDP packets (probes, acks,
	// gossip); BytesSent and BytesReceived their bytes.
	PacketsSent, PacketsReceived, BytesSent, BytesReceived uint64
	// StreamsOpened and StreamsAccepted count TCP connections this host
	// opened and accepted (joins, push/pull state exchanges, fallback
	// probes); StreamBytesSent and StreamBytesReceived the bytes over
	// them.
	StreamsOpened, StreamsAccepted, StreamBytesSent, StreamBytesReceived uint64
}

// counters are a Traffic being counted.
type counters struct {
	packetsSent, packetsReceived, bytesSent, bytesReceived               atomic.Uint64
	streamsOpened, streamsAccepted, streamBytesSent, streamBytesReceived atomic.Uint64
}

func (c *counters) load() Traffic {
	return Traffic{
		PacketsSent: c.packetsSent.Load(), PacketsReceived: c.packetsReceived.Load(),
		BytesSent: c.bytesSent.Load(), BytesReceived: c.bytesReceived.Load(),
		StreamsOpened: c.streamsOpened.Load(), StreamsAccepted: c.streamsAccepted.Load(),
		StreamBytesSent: c.streamBytesSent.Load(), StreamBytesReceived: c.streamBytesReceived.Load(),
	}
}

// countingTransport is a memberlist transport that counts what another
// one sends and receives. memberlist's own counters go to a process-wide
// sink (hashicorp/go-metrics), which this project does not use.
type countingTransport struct {
	next    memberlist.NodeAwareTransport
	c       *counters
	packets chan *memberlist.Packet
	streams chan net.Conn
	done    chan struct{}
	once    sync.Once
}

var _ memberlist.NodeAwareTransport = (*countingTransport)(nil)

// newCountingTransport counts what next sends and receives into c, and
// starts the goroutines that relay what it receives; Shutdown stops them.
func newCountingTransport(next memberlist.Transport, c *counters) *countingTransport {
	na, ok := next.(memberlist.NodeAwareTransport)
	if !ok {
		na = nodeAware{next}
	}
	t := &countingTransport{
		next:    na,
		c:       c,
		packets: make(chan *memberlist.Packet),
		streams: make(chan net.Conn),
		done:    make(chan struct{}),
	}
	go relay(t.done, next.PacketCh(), t.packets, func(p *memberlist.Packet) *memberlist.Packet {
		c.packetsReceived.Add(1)
		c.bytesReceived.Add(uint64(len(p.Buf)))
		return p
	})
	go relay(t.done, next.StreamCh(), t.streams, func(conn net.Conn) net.Conn {
		c.streamsAccepted.Add(1)
		return &countingConn{Conn: conn, c: c}
	})
	return t
}

// relay passes what arrives on in to out, through f, until done is closed.
func relay[T any](done <-chan struct{}, in <-chan T, out chan<- T, f func(T) T) {
	for {
		select {
		case v, ok := <-in:
			if !ok {
				return
			}
			select {
			case out <- f(v):
			case <-done:
				return
			}
		case <-done:
			return
		}
	}
}

func (t *countingTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	return t.next.FinalAdvertiseAddr(ip, port)
}

func (t *countingTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	at, err := t.next.WriteTo(b, addr)
	t.sent(len(b), err)
	return at, err
}

func (t *countingTransport) WriteToAddress(b []byte, addr memberlist.Address) (time.Time, error) {
	at, err := t.next.WriteToAddress(b, addr)
	t.sent(len(b), err)
	return at, err
}

func (t *countingTransport) sent(n int, err error) {
	if err == nil {
		t.c.packetsSent.Add(1)
		t.c.bytesSent.Add(uint64(n))
	}
}

func (t *countingTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

func (t *countingTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.opened(t.next.DialTimeout(addr, timeout))
}

func (t *countingTransport) DialAddressTimeout(addr memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.opened(t.next.DialAddressTimeout(addr, timeout))
}

func (t *countingTransport) opened(conn net.Conn, err error) (net.Conn, error) {
	if err != nil {
		return nil, err
	}
	t.c.streamsOpened.Add(1)
	return &countingConn{Conn: conn, c: t.c}, nil
}

func (t *countingTransport) StreamCh() <-chan net.Conn { return t.streams }

// Shutdown shuts the transport down, then stops the relays: while it
// shuts down, its listeners may still be handing over a packet or a
// connection, which a relay must take (memberlist reads until after
// Shutdown returns), or its Shutdown would wait for them forever.
func (t *countingTransport) Shutdown() error {
	err := t.next.Shutdown()
	t.once.Do(func() { close(t.done) })
	return err
}

// countingConn counts the bytes of a gossip stream.
type countingConn struct {
	net.Conn
	c *counters
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.c.streamBytesReceived.Add(uint64(n))
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.c.streamBytesSent.Add(uint64(n))
	return n, err
}

// nodeAware makes a plain memberlist.Transport a NodeAwareTransport, as
// memberlist itself does with one.
type nodeAware struct{ memberlist.Transport }

func (t nodeAware) WriteToAddress(b []byte, addr memberlist.Address) (time.Time, error) {
	return t.WriteTo(b, addr.Addr)
}

func (t nodeAware) DialAddressTimeout(addr memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(addr.Addr, timeout)
}

// bindAttempts is how often a transport on an ephemeral port (BindPort 0)
// is tried: memberlist's own number. The UDP and TCP sockets must get the
// same port, which another process may take between the two.
const bindAttempts = 10

// netTransport returns memberlist's UDP and TCP transport bound to
// addr:port, and the port it bound.
func netTransport(addr string, port int, mc *memberlist.Config) (*memberlist.NetTransport, int, error) {
	nc := &memberlist.NetTransportConfig{BindAddrs: []string{addr}, BindPort: port, Logger: mc.Logger}
	attempts := 1
	if port == 0 {
		attempts = bindAttempts
	}
	var err error
	for range attempts {
		var nt *memberlist.NetTransport
		if nt, err = memberlist.NewNetTransport(nc); err == nil {
			return nt, nt.GetAutoBindPort(), nil
		}
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	return nil, 0, fmt.Errorf("gossip: listen on %s: %w", net.JoinHostPort(addr, fmt.Sprint(port)), err)
}
