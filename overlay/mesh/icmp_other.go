//go:build !linux

package mesh

import (
	"context"
	"errors"
	"net/netip"
	"time"
)

// ICMP is the Linux pinger; elsewhere it cannot be opened.
type ICMP struct{}

// ListenICMP fails: the health mesh needs Linux.
func ListenICMP() (*ICMP, error) { return nil, errors.ErrUnsupported }

// Close does nothing.
func (c *ICMP) Close() error { return nil }

// Ping fails.
func (c *ICMP) Ping(context.Context, netip.Addr, int) (time.Duration, error) {
	return 0, errors.ErrUnsupported
}
