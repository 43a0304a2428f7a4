package org.elasticsearch.node;

import java.util.List;

import org.elasticsearch.env.Environment;
import org.elasticsearch.plugins.ClasspathPluginsService;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.PluginsLoader;
import org.elasticsearch.plugins.PluginsService;

/**
 * An Elasticsearch node whose plugins (here the Netty HTTP and transport layer) come from
 * the classpath. Node's constructor that takes a service provider is package-private, hence
 * this package. Elasticsearch 9 passes a {@link PluginsLoader} (the module and plugin
 * bundles found on disk) to the node; here it is an empty one.
 */
public final class ClasspathPluginsNode extends Node {
    public ClasspathPluginsNode(Environment environment, List<Class<? extends Plugin>> plugins) {
        super(NodeConstruction.prepareConstruction(environment, ClasspathPluginsService.emptyLoader(), new NodeServiceProvider() {
            @Override
            PluginsService newPluginService(Environment env, PluginsLoader pluginsLoader) {
                return new ClasspathPluginsService(env.settings(), env, pluginsLoader, plugins);
            }
        }, true));
    }
}
