package org.elasticsearch.plugins;

import java.util.List;

/**
 * What both Elasticsearch versions' {@code ClasspathPluginsService} share: a plugin class on
 * the classpath, made, and the descriptor it is listed under. (Each version's service wraps
 * them in its own {@link PluginsService.LoadedPlugin}, whose constructor changed in 9.)
 */
final class ClasspathPlugins {
    private ClasspathPlugins() {}

    static Plugin instantiate(Class<? extends Plugin> pluginClass) {
        try {
            return pluginClass.getConstructor().newInstance();
        } catch (ReflectiveOperationException e) {
            throw new IllegalStateException("cannot instantiate " + pluginClass.getName(), e);
        }
    }

    static PluginDescriptor descriptor(Class<? extends Plugin> pluginClass) {
        return new PluginDescriptor(
            pluginClass.getName(),
            "classpath plugin",
            "NA",
            org.elasticsearch.Build.current().version(),
            Integer.toString(Runtime.version().feature()),
            pluginClass.getName(),
            null,
            List.of(),
            false,
            false,
            false,
            false
        );
    }
}
